"""The corpus of real community model descriptions at ../shared/data/zoo (see tests/data/README.md), made runnable
offline without copying code from public repositories.

Tests load them with every HTTP(S) request sent to a closed port on 127.0.0.1 (``no_network``), so nothing is ever
downloaded, even where CI has network. The corpus holds descriptions, weights and test tensors but no architecture
source files; ``runnable`` writes a copy of a package into a temporary folder whose pytorch_state_dict entry names
an architecture that exists here:

- ``torch_em``: the U-Nets of the torch-em package from PyPI (``torch_em.model.unet``), in the description's import
  form, with the description's own kwargs;
- ``own``: the spec example ``unet2d_nuclei_broad``'s U-Net as this project wrote it from the layer names and shapes
  of the package's TorchScript weights (tests/zoo_architectures/unet2d_nuclei_broad.py), as a local file.

Its weights are the package's own where the corpus holds them (``vendored``), its TorchScript's state dict
(``from_torchscript``: the real trained weights), or seeded random ones (``random``: the zoo's weights live on
Zenodo and are never downloaded). The description keeps its other, remote weight entries, so the adapter must pick
the local file.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from shared_data import SHARED_DATA

ZOO = SHARED_DATA / "zoo"
OWN_ARCHITECTURES = Path(__file__).parent / "zoo_architectures"
NUCLEI = "spec/unet2d_nuclei_broad"


@dataclass(frozen=True)
class Description:
    name: str
    rdf: str  # relative to ZOO
    weights: str = "vendored"  # "vendored" (as the corpus holds them), "from_torchscript" or "random"
    architecture: str | None = None  # None (as described), "torch_em" or "own" (see the module docstring)
    options: dict[str, Any] = field(default_factory=dict)  # load_adapter options the model needs
    uint8: bool = False  # the description declares uint8 inputs
    core_weights: str | None = None  # the weights bioimageio.core predicts with, where not the adapter's
    rewritten: bool = False  # bioimageio.spec cannot convert it as written: compare core on bioadapt's rewrite
    edit: Callable[[dict], None] | None = None  # a change to the raw description (a variant of a real one)
    sample_source: str = "dropout"  # how MC passes differ: "dropout" or "tta" (test-time augmentation)


def _without_halo(content: dict) -> None:
    """unet2d_nuclei_broad as a fixed-shape description without a halo (its real weights, 512 x 512 blocks)."""
    for axis in content["outputs"][0]["axes"]:
        axis.pop("halo", None)


RUNS = [
    Description("nuclei-broad-torchscript", f"{NUCLEI}/bioimageio.yaml", core_weights="torchscript",
                sample_source="tta"),
    Description("nuclei-broad-state-dict", f"{NUCLEI}/bioimageio.yaml", weights="from_torchscript",
                architecture="own"),
    Description("nuclei-broad-no-halo", f"{NUCLEI}/bioimageio.yaml", weights="from_torchscript",
                architecture="own", edit=_without_halo),
    Description("nuclei-broad-0.4.9", f"{NUCLEI}/v0_4_9.bioimageio.yaml", core_weights="torchscript",
                sample_source="tta"),
    Description("nuclei-broad-0.4.0-state-dict", f"{NUCLEI}/v0_4_0.bioimageio.yaml", weights="from_torchscript",
                architecture="own"),
    Description("nuclei-broad-expand-0.5", f"{NUCLEI}/expand_output_shape.bioimageio.yaml",
                weights="from_torchscript", architecture="own"),
    Description("fixed-shape-0.4", "spec/unet2d_fixed_shape/v0_4.bioimageio.yaml", architecture="torch_em",
                options={"output_activation": "sigmoid"}, rewritten=True),
    Description("affable-shark", "collection/affable-shark/rdf.yaml", weights="random", architecture="torch_em",
                uint8=True),
    Description("epithelia-affinity", "collection/epithelia-affinity/rdf.yaml", weights="random",
                architecture="torch_em"),
    Description("platynereis-nuclei-3d", "collection/platynereis-nuclei/rdf.yaml", weights="random",
                architecture="torch_em", uint8=True),
]
BY_NAME = {d.name: d for d in RUNS}

# description -> the refusal sentence expected at load (a regular expression)
REFUSED = {
    "spec/unet2d_diff_output_shape/bioimageio.yaml": r"output axis y is 0\.5 times the input's size",
    "spec/upsample_test_model/v0_4.bioimageio.yaml": r"output axis y is 4 times the input's size",
    "spec/unet2d_multi_tensor/bioimageio.yaml": r"has 2 inputs; bioadapt adapts single-input models",
    "spec/unet2d_keras_tf/v0_4.bioimageio.yaml": r"which need tensorflow; install tensorflow \(inference only\)",
    "spec/stardist_example_model/v0_4.bioimageio.yaml": r"which need tensorflow; install tensorflow",
    "collection/bacteria-keras/rdf.yaml": r"which need tensorflow; install tensorflow",
    "collection/hpa-densenet-classifier/rdf.yaml": r"maps the input's spatial axes \['y', 'x'\] away",
    "collection/label-free-monai/rdf.yaml": r"its pytorch_state_dict weights need monai",
    "collection/hpa-cell-segmentation/rdf.yaml": r"could not download .* from https://zenodo\.org/.*where there is "
                                                 r"network, download the package",
}
CLOSED_PORT = "http://127.0.0.1:9"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def no_network(monkeypatch, tmp: Path) -> None:
    """Send every HTTP(S) request of bioimageio.spec/core (httpx reads the proxy settings per request) to a closed
    port, with an empty download cache."""
    from bioimageio.spec import settings

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, CLOSED_PORT)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(settings, "cache_path", tmp / "bioimageio-cache")


def runnable(description: Description, tmp: Path) -> Path:
    """The description's rdf, ready to load offline: the corpus file itself, or a copy of its package in ``tmp``
    with the architecture and weights the description names made local."""
    source = ZOO / description.rdf
    if description.weights == "vendored" and description.architecture is None and description.edit is None:
        return source
    folder = tmp / description.name
    shutil.copytree(source.parent, folder)
    rdf = folder / source.name
    content = yaml.safe_load(rdf.read_text())
    if description.edit is not None:
        description.edit(content)
    entry = content["weights"]["pytorch_state_dict"]
    old_format = str(content["format_version"]).startswith("0.4")
    kwargs = entry.get("kwargs") or {}
    if description.architecture == "torch_em":
        callable_name = _callable_name(entry, old_format)
        _point_at_module(entry, old_format, "torch_em.model.unet", callable_name)
        build = lambda: getattr(importlib.import_module("torch_em.model.unet"), callable_name)(**kwargs)  # noqa: E731
    elif description.architecture == "own":
        callable_name = "UNet2dExpandOutputShape" if "expand" in source.name else "UNet2d"
        file = folder / "unet2d_nuclei_broad.py"
        shutil.copy(OWN_ARCHITECTURES / file.name, file)
        _point_at_file(entry, old_format, file, callable_name)
        build = lambda: _from_file(file, callable_name)(**kwargs)  # noqa: E731
    if description.weights == "from_torchscript":
        state = torch.jit.load(str(ZOO / NUCLEI / "weights.pt")).state_dict()
        _write_weights(entry, folder / "weights_state_dict.pt", state)
    elif description.weights == "random":
        torch.manual_seed(0)
        _write_weights(entry, folder / "weights_random.pt", build().state_dict())
    rdf.write_text(yaml.safe_dump(content, sort_keys=False))
    return rdf


def _callable_name(entry: dict, old_format: bool) -> str:
    if old_format:
        return entry["architecture"].rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    return entry["architecture"]["callable"]


def _point_at_module(entry: dict, old_format: bool, module: str, callable_name: str) -> None:
    if old_format:
        entry["architecture"] = f"{module}.{callable_name}"
        entry.pop("architecture_sha256", None)
    else:
        entry["architecture"] = {"import_from": module, "callable": callable_name,
                                 "kwargs": entry["architecture"].get("kwargs", {})}


def _point_at_file(entry: dict, old_format: bool, file: Path, callable_name: str) -> None:
    if old_format:
        entry["architecture"] = f"{file.name}:{callable_name}"
        entry["architecture_sha256"] = sha256(file)
    else:
        entry["architecture"] = {"source": file.name, "sha256": sha256(file), "callable": callable_name,
                                 "kwargs": entry["architecture"].get("kwargs", {})}


def _write_weights(entry: dict, path: Path, state: dict[str, torch.Tensor]) -> None:
    torch.save(state, path)
    entry["source"], entry["sha256"] = path.name, sha256(path)


def _from_file(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"zoo_arch_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def assert_within_tolerance(actual: Any, expected: Any, descr: Any) -> None:
    """``actual`` matches ``expected`` as the description's own model test demands: |a - e| <= atol + rtol |e| on
    all but the allowed mismatched elements per million (config.bioimageio.reproducibility_tolerance in format 0.5;
    bioimageio.spec's defaults otherwise: 1e-3, 1e-3, 100 ppm)."""
    import numpy as np
    from bioimageio.spec.model import v0_5

    config = getattr(descr.config, "bioimageio", None)
    entries = list(getattr(config, "reproducibility_tolerance", ()) or ()) or [v0_5.ReproducibilityTolerance()]
    tolerance = entries[0]
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    difference = np.abs(actual - expected)
    mismatched = difference > tolerance.absolute_tolerance + tolerance.relative_tolerance * np.abs(expected)
    ppm = mismatched.sum() / mismatched.size * 1e6
    assert ppm <= tolerance.mismatched_elements_per_million, (
        f"{mismatched.sum()} elements ({ppm:.0f} ppm) beyond atol {tolerance.absolute_tolerance} + rtol "
        f"{tolerance.relative_tolerance}; max difference {difference.max():.3g}")
