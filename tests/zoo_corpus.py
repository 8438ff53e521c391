"""The corpus of real community model descriptions in tests/data/zoo (see its README.md), made runnable offline.

Tests load them with every HTTP(S) request sent to a closed port on 127.0.0.1 (``no_network``), so nothing
is ever downloaded, even where CI has network. Descriptions whose weights are in the vendored files run as
they are. The model zoo's weights live on Zenodo and are not vendored: for those the
test writes weights into the copy, either converted from the package's own TorchScript (same network, real
weights) or drawn at random (seeded) from the real architecture file; the description then points at the local
file and keeps its other, remote weight entries.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

ZOO = Path(__file__).parent / "data" / "zoo"
TORCH_EM_UNET = ZOO / "torch-em" / "unet.py"


@dataclass(frozen=True)
class Description:
    name: str
    rdf: str  # relative to ZOO
    weights: str = "vendored"  # "vendored", "from_torchscript" or "random"
    options: dict[str, Any] = field(default_factory=dict)  # load_adapter options the model needs
    uint8: bool = False  # the description declares uint8 inputs
    core_weights: str | None = None  # the weights bioimageio.core predicts with, where not the adapter's
    rewritten: bool = False  # bioimageio.spec cannot convert it as written: compare core on bioadapt's rewrite


RUNS = [
    Description("nuclei-broad-0.5", "spec/unet2d_nuclei_broad/bioimageio.yaml", core_weights="torchscript"),
    Description("nuclei-broad-0.4.9", "spec/unet2d_nuclei_broad/v0_4_9.bioimageio.yaml", core_weights="torchscript"),
    Description("nuclei-broad-0.4.0-state-dict", "spec/unet2d_nuclei_broad/v0_4_0.bioimageio.yaml",
                weights="from_torchscript"),
    Description("nuclei-broad-expand-0.5", "spec/unet2d_nuclei_broad/expand_output_shape.bioimageio.yaml",
                weights="from_torchscript"),
    Description("fixed-shape-0.4", "spec/unet2d_fixed_shape/v0_4.bioimageio.yaml",
                options={"output_activation": "sigmoid"}, rewritten=True),
    Description("affable-shark", "collection/affable-shark/rdf.yaml", weights="random", uint8=True),
    Description("epithelia-affinity", "collection/epithelia-affinity/rdf.yaml", weights="random"),
    Description("platynereis-nuclei-3d", "collection/platynereis-nuclei/rdf.yaml", weights="random", uint8=True),
]

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
    """The description's rdf, ready to load offline (a copy with local weights where the test writes them)."""
    source = ZOO / description.rdf
    if description.weights == "vendored":
        return source
    folder = tmp / description.name
    shutil.copytree(source.parent, folder)
    rdf = folder / source.name
    content = yaml.safe_load(rdf.read_text())
    entry = content["weights"]["pytorch_state_dict"]
    if description.weights == "from_torchscript":
        state = torch.jit.load(str(folder / "weights.pt")).state_dict()
        name = "weights_state_dict.pt"
    else:
        shutil.copy(TORCH_EM_UNET, folder / "unet.py")
        callable_name = entry["architecture"].rsplit(":", 1)[1]
        entry["architecture"] = f"unet.py:{callable_name}"
        entry["architecture_sha256"] = sha256(folder / "unet.py")
        state = random_weights(folder / "unet.py", callable_name, entry.get("kwargs") or {})
        name = "weights_random.pt"
    torch.save(state, folder / name)
    entry["source"], entry["sha256"] = name, sha256(folder / name)
    rdf.write_text(yaml.safe_dump(content, sort_keys=False))
    return rdf


def random_weights(architecture: Path, callable_name: str, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    spec = importlib.util.spec_from_file_location(f"zoo_arch_{callable_name}", architecture)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return getattr(module, callable_name)(**kwargs).state_dict()
