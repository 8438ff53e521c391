"""Package metadata checked before anything is written, version bumps, and the cover image."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bioadapt.errors import BioadaptError


@dataclass(frozen=True)
class Metadata:
    name: str
    description: str
    authors: tuple[str, ...]
    license: str | None = None
    version: str | None = None
    cite: tuple[dict, ...] = ()
    tags: tuple[str, ...] = ()

    @classmethod
    def checked(cls, name: str, description: str, authors: Sequence[str], license: str | None,
                version: str | None, cite: Sequence[dict] | None, tags: Sequence[str] | None) -> Metadata:
        """Metadata bioimage.io will accept, or a BioadaptError saying what to fix (nothing written yet)."""
        from bioimageio.spec.model.v0_5 import LicenseId
        from pydantic import ValidationError

        if not name or not name.strip():
            raise BioadaptError("the package needs a name (a few words saying what the model segments)")
        if not description or not description.strip():
            raise BioadaptError("the package needs a description")
        if isinstance(authors, str) or not authors or not all(isinstance(a, str) and a.strip() for a in authors):
            raise BioadaptError("the package needs authors: a list of names, e.g. authors=['Ada Lovelace']")
        if license is not None:
            try:
                LicenseId(license)
            except ValidationError:
                raise BioadaptError(f"licence {license!r} is not an SPDX licence id bioimage.io knows; use e.g. "
                                    "'MIT', 'CC-BY-4.0' or 'Apache-2.0'") from None
        for entry in cite or ():
            if not isinstance(entry, dict) or "text" not in entry or not ({"doi", "url"} & set(entry)):
                raise BioadaptError(f"each cite entry needs 'text' and a 'doi' or 'url', got {entry!r}")
        return cls(name.strip(), description.strip(), tuple(a.strip() for a in authors), license, version,
                   tuple(cite or ()), tuple(tags or ()))


def annotated_patch(model: Any, training: Mapping[str, Any]) -> np.ndarray:
    """The patch for an export's test tensors: ``training["test_input"]``, else the first sample of the model's
    last fine-tuning; (C, *spatial) float32. Never a placeholder."""
    patch = training.get("test_input")
    if patch is None:
        patch = model.training_record.example_image if model.training_record is not None else None
    if patch is None:
        raise BioadaptError("export needs a real annotated patch for the test tensors: fine-tune the model first, "
                            "or pass training={'test_input': image (C, *spatial)}")
    return np.asarray(patch, dtype=np.float32)


def bump_version(version: object | None) -> str:
    """The parent's version with its last number raised (1.2.3 -> 1.2.4); 0.1.0 when it had none."""
    if version is None:
        return "0.1.0"
    parts = str(version).split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            parts[i] = str(int(parts[i]) + 1)
            return ".".join(parts[: i + 1] + ["0"] * (len(parts) - i - 1))
    return f"{version}.1"


def _to_uint8(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, (1, 99.8))
    return (np.clip((image - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)


def write_cover(path: Path, image: np.ndarray, probabilities: np.ndarray) -> Path:
    """A 2:1 PNG: the input (first channel, middle Z slice) beside the foreground probability."""
    from skimage.io import imsave

    def plane(a: np.ndarray) -> np.ndarray:
        return a[a.shape[0] // 2] if a.ndim == 3 else a

    left = _to_uint8(plane(image[0]))
    right = (np.clip(plane(probabilities[-1]), 0, 1) * 255).astype(np.uint8)
    imsave(path, np.concatenate([left, right], axis=1), check_contrast=False)
    return path
