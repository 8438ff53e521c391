"""Which weights of a bioimage.io package bioadapt runs, and the network bioimageio.core loads from them.

Torch weights (pytorch_state_dict, torchscript) are trainable; onnx, tensorflow and keras weights run for
inference only, and only where their runtime is installed. Local files come before remote ones, so a package
that holds any usable weights works offline; a download that fails becomes a BioadaptError naming the URL.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bioimageio.spec.common import Sha256

from bioadapt.errors import BioadaptError

TRAINABLE_FORMATS = ("pytorch_state_dict", "torchscript")
INFERENCE_FORMATS = ("onnx", "tensorflow_saved_model_bundle", "keras_hdf5", "keras_v3")
ALL_FORMATS = TRAINABLE_FORMATS + INFERENCE_FORMATS + ("tensorflow_js",)
# the Python package each format's bioimageio.core backend imports
RUNTIMES = {"pytorch_state_dict": ("torch",), "torchscript": ("torch",), "onnx": ("onnxruntime",),
            "tensorflow_saved_model_bundle": ("tensorflow",), "keras_hdf5": ("tensorflow", "keras"),
            "keras_v3": ("keras",)}
NETWORK_ERRORS = ("ConnectError", "ConnectTimeout", "ReadTimeout", "HTTPStatusError", "HTTPError", "URLError",
                  "TimeoutError", "gaierror")


def present_formats(descr: Any) -> list[str]:
    return [f for f in ALL_FORMATS if getattr(descr.weights, f, None) is not None]


def missing_runtime(descr: Any, weights_format: str) -> str | None:
    """The package a format needs that is not installed here, or None when it can run."""
    if weights_format not in RUNTIMES:
        return "a JavaScript runtime (bioimageio.core does not run tensorflow_js)"
    if not any(importlib.util.find_spec(name) for name in RUNTIMES[weights_format]):
        return RUNTIMES[weights_format][0]
    if weights_format == "pytorch_state_dict":
        module = getattr(descr.weights.pytorch_state_dict.architecture, "import_from", None)
        if module and importlib.util.find_spec(module.split(".")[0]) is None:
            return module.split(".")[0]
    return None


def is_remote(descr: Any, weights_format: str) -> bool:
    """Whether using these weights needs a download (the weights file, or an architecture file)."""
    entry = getattr(descr.weights, weights_format)
    sources = [entry.source]
    architecture = getattr(entry, "architecture", None)
    if weights_format == "pytorch_state_dict" and getattr(architecture, "source", None) is not None:
        sources.append(architecture.source)
    return any(_is_url(s) for s in sources)


def _is_url(source: Any) -> bool:
    absolute = source.absolute() if hasattr(source, "absolute") else source
    return str(absolute).startswith(("http://", "https://"))


def remote_urls(descr: Any, weights_format: str) -> list[str]:
    entry = getattr(descr.weights, weights_format)
    sources = [entry.source, getattr(getattr(entry, "architecture", None), "source", None)]
    return [str(s.absolute() if hasattr(s, "absolute") else s) for s in sources if s is not None and _is_url(s)]


def choose_format(descr: Any, wanted: str | None = None) -> str:
    """The weights bioadapt runs: ``wanted`` if given and runnable; else trainable before inference-only formats
    and, within those, local files before remote ones. One sentence says why when none can run."""
    name = descr.name
    present = present_formats(descr)
    if wanted is not None:
        if wanted not in present:
            raise BioadaptError(f"{name} has no {wanted} weights; it has {present}")
        needs = missing_runtime(descr, wanted)
        if needs is not None:
            raise BioadaptError(f"{name}'s {wanted} weights need {needs}; install it or choose another of "
                                f"{present} with weights_format=")
        return wanted
    runnable = [f for f in present if missing_runtime(descr, f) is None]
    if not runnable:
        needs = sorted({missing_runtime(descr, f) for f in present})
        trainable = [f for f in present if f in TRAINABLE_FORMATS]
        advice = (f"install {' or '.join(needs)}" if trainable else
                  f"install {' or '.join(needs)} (inference only), or choose a package with pytorch_state_dict "
                  "or torchscript weights")
        raise BioadaptError(f"{name} has {', '.join(present) or 'no'} weights, which need "
                            f"{' or '.join(needs)}; {advice}")
    local = [f for f in runnable if not is_remote(descr, f)]
    return (local or runnable)[0]


def load_core_adapter(descr: Any, weights_format: str, device: str) -> Any:
    """bioimageio.core's model adapter for these weights, loaded on ``device``; errors say what to do."""
    from bioimageio.core.backends import create_model_adapter

    try:
        return create_model_adapter(descr, devices=[device], weight_format_priority_order=[weights_format])
    except ModuleNotFoundError as e:
        raise BioadaptError(f"{descr.name}'s {weights_format} weights need the Python package {e.name!r}, which "
                            "is not installed; install it or choose other weights with weights_format=") from e
    except Exception as e:  # noqa: BLE001 - bioimageio.core raises httpx, OSError, ValueError, RuntimeError here
        urls = remote_urls(descr, weights_format)
        if urls and _is_network_error(e):
            others = [f"its {f} weights need {missing_runtime(descr, f)}" for f in present_formats(descr)
                      if missing_runtime(descr, f) is not None]
            raise BioadaptError(
                f"could not download {descr.name}'s {weights_format} weights from {urls[0]} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); where there is network, download the package (.zip) and pass "
                "its local path, or put the file beside the rdf.yaml and point the weights' source to it"
                + (f" ({'; '.join(others)})" if others else "")) from e
        raise BioadaptError(f"could not load {descr.name}'s {weights_format} weights: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300] if str(e) else ''}") from e


def _is_network_error(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__name__ in NETWORK_ERRORS or isinstance(error, (ConnectionError, TimeoutError)):
            return True
        error = error.__cause__ or error.__context__
    return False


def held_network(core_adapter: Any) -> Any:
    """The torch module inside bioimageio.core's pytorch or torchscript model adapter (one per device in a
    queue; bioadapt loads one device). Hooks and training act on this very module, so the adapter's forward
    and ours run the same network."""
    device, module = core_adapter._model_queue.get()
    core_adapter._model_queue.put((device, module))
    return module


@contextmanager
def torchscript_as_state_dict(descr: Any, device: str) -> Iterator[Any | None]:
    """The description running its local TorchScript weights through its pytorch_state_dict architecture, or
    None where that is not the same network.

    Packages often hold TorchScript weights locally and their state dict remotely (or not at all), with the
    architecture file beside them. TorchScript takes no forward hooks, so MC dropout could not make it
    stochastic; its state dict in the architecture can. Used only when the state dict loads strictly and both
    networks agree to 1e-4 on an input of the smallest valid shape. The weights file lives while the context does
    (bioimageio.core reads it when its model adapter loads).
    """
    state = _torchscript_state(descr, device)
    if state is None:
        yield None
        return
    entry = descr.weights.pytorch_state_dict
    with tempfile.TemporaryDirectory(prefix="bioadapt-weights-") as folder:
        path = Path(folder) / "weights_from_torchscript.pt"
        torch.save(state, path)
        converted = entry.model_copy(update={"source": path, "sha256": Sha256(_sha256(path))})
        yield descr.model_copy(update={"weights": descr.weights.model_copy(update={"pytorch_state_dict": converted})})


def _torchscript_state(descr: Any, device: str) -> dict[str, torch.Tensor] | None:
    entry = descr.weights.pytorch_state_dict
    if entry is None or descr.weights.torchscript is None or missing_runtime(descr, "pytorch_state_dict"):
        return None
    architecture_source = getattr(entry.architecture, "source", None)
    if architecture_source is not None and _is_url(architecture_source):
        return None
    from bioimageio.core.backends.pytorch_backend import load_torch_model

    try:
        module = load_torch_model(entry, load_state=False, devices=[device]).eval()
        scripted = torch.jit.load(io.BytesIO(descr.weights.torchscript.get_reader().read()), map_location=device)
        scripted.eval()
        module.load_state_dict(scripted.state_dict(), strict=True)
        difference = None
        for example in _example_inputs(descr, device):
            try:
                with torch.no_grad():
                    difference = float((_first(module(example)) - _first(scripted(example))).abs().max())
                break
            except RuntimeError:  # the small example does not fit the network; the valid one will
                continue
    except Exception:  # noqa: BLE001 - any failure means: not the same network, keep the TorchScript
        return None
    return module.state_dict() if difference is not None and difference <= 1e-4 else None


def _example_inputs(descr: Any, device: str) -> Iterator[torch.Tensor]:
    """Seeded random inputs in the model's axis order: a small one (at most 64 per axis; fully convolutional
    networks take it and it is quick), then one of the smallest valid shape."""
    from bioadapt.adapters.bioimageio_layout import Layout

    layout = Layout(descr)
    generator = torch.Generator().manual_seed(0)
    for spatial in ([min(s, 64) for s in layout.grid.smallest], layout.grid.smallest):
        shape = layout.to_model(np.zeros((1, layout.input_channels, *spatial), np.float32)).shape
        yield torch.randn(shape, generator=generator).to(device)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
