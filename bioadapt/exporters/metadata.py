"""Package metadata checked before anything is written, version bumps, and the cover image."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bioadapt.errors import BioadaptError


Person = str | Mapping[str, Any]


@dataclass(frozen=True)
class Metadata:
    """Checked package metadata; authors, maintainers and cite entries in bioimage.io's (format 0.5) shapes, as
    plain dicts (``{"name": ..., "affiliation": ..., "orcid": ...}``, ``{"github_user": ...}``,
    ``{"text": ..., "doi" or "url": ...}``)."""

    name: str
    description: str
    authors: tuple[dict[str, Any], ...]
    license: str | None = None
    version: str | None = None
    cite: tuple[dict[str, Any], ...] = ()
    tags: tuple[str, ...] = ()
    maintainers: tuple[dict[str, Any], ...] = ()

    @classmethod
    def checked(cls, name: str, description: str, authors: Sequence[Person], license: str | None,
                version: str | None, cite: Sequence[Mapping[str, Any]] | None, tags: Sequence[str] | None,
                maintainers: Sequence[Person] | None = None) -> Metadata:
        """Metadata bioimage.io will accept, or a BioadaptError saying what to fix (nothing written yet).

        ``authors``: names, or the spec's author entries (``name`` plus optional ``affiliation``, ``email``,
        ``orcid``, ``github_user``); ``maintainers``: GitHub user names, or the spec's maintainer entries
        (``github_user`` plus optional ``name``, ...); ``cite``: the spec's entries (``text`` and ``doi`` or ``url``).
        """
        from bioimageio.spec.model import v0_5
        from bioimageio.spec.model.v0_5 import LicenseId
        from pydantic import ValidationError

        if not name or not name.strip():
            raise BioadaptError("the package needs a name (a few words saying what the model segments)")
        if not description or not description.strip():
            raise BioadaptError("the package needs a description")
        if isinstance(authors, (str, Mapping)) or not authors:
            raise BioadaptError("the package needs authors: a list of names or of bioimage.io author entries, e.g. "
                                "authors=['Ada Lovelace'] or authors=[{'name': 'Ada Lovelace', 'affiliation': '...'}]")
        if license is not None:
            try:
                LicenseId(license)
            except ValidationError:
                raise BioadaptError(f"licence {license!r} is not an SPDX licence id bioimage.io knows; use e.g. "
                                    "'MIT', 'CC-BY-4.0' or 'Apache-2.0'") from None
        if isinstance(maintainers, (str, Mapping)) or isinstance(cite, Mapping):
            raise BioadaptError("maintainers and cite are lists of entries, e.g. maintainers=['octocat'], "
                                "cite=[{'text': '...', 'doi': '10....'}]")
        return cls(name.strip(), description.strip(),
                   _entries(authors, v0_5.Author, "name", "author", "a name or {'name': ..., 'affiliation': ...}"),
                   license, version,
                   _entries(cite or (), v0_5.CiteEntry, None, "cite entry", "{'text': ..., 'doi' or 'url': ...}"),
                   tuple(tags or ()),
                   _entries(maintainers or (), v0_5.Maintainer, "github_user", "maintainer",
                            "a GitHub user name or {'github_user': ..., 'name': ...}"))


def _entries(items: Sequence[Any], spec: type, plain_field: str | None, what: str,
             shape: str) -> tuple[dict[str, Any], ...]:
    """Each item as a dict the spec's ``spec`` class accepts; a plain string fills ``plain_field``."""
    from bioimageio.spec import ValidationContext
    from pydantic import ValidationError

    out = []
    for item in items:
        if isinstance(item, str) and plain_field is not None and item.strip():
            item = {plain_field: item.strip()}
        if not isinstance(item, Mapping):
            raise BioadaptError(f"each {what} must be {shape}; got {item!r}")
        try:
            with ValidationContext(perform_io_checks=False):
                entry = spec.model_validate(dict(item))
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or what}: {err['msg']}" for err in e.errors())
            raise BioadaptError(f"{what} {dict(item)!r} is not valid for bioimage.io ({problems}); "
                                f"give {shape}") from None
        out.append(entry.model_dump(mode="json", exclude_none=True))
    return tuple(out)


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
