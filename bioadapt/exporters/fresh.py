"""Package a freshly built torch network as a valid bioimage.io model package, offline.

Used to make base models for tests, the demo and benchmarks. The test output is computed by
bioimageio.core's own prediction pipeline on the description, so it matches what consumers get
after pre- and post-processing.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from bioimageio.core import create_prediction_pipeline
from bioimageio.core.digest_spec import get_axes_infos, get_test_input_sample
from bioimageio.spec import (
    InvalidDescr,
    ValidationContext,
    load_description,
    save_bioimageio_package,
    save_bioimageio_package_as_folder,
)
from bioimageio.spec.model import v0_4, v0_5
from bioimageio.spec.utils import get_sha256
from pydantic import ValidationError

from bioadapt.errors import BioadaptError

DEFAULT_ARCHITECTURE = Path(__file__).resolve().parent.parent / "adapters" / "unet.py"
WEIGHT_FORMATS = ("pytorch_state_dict", "torchscript", "onnx")
ONNX_OPSET = 17
_FILE_NAMES = {"pytorch_state_dict": "weights.pt", "torchscript": "weights_torchscript.pt", "onnx": "weights.onnx",
               "test_input": "test_input.npy", "test_output": "test_output.npy", "documentation": "README.md"}
_UNET_CITE = ("Ronneberger, Fischer, Brox: U-Net: Convolutional Networks for Biomedical Image Segmentation. MICCAI 2015.",
              "10.1007/978-3-319-24574-4_28")
_SCALE_RANGE_PERCENTILES = (1.0, 99.8)


@dataclass(frozen=True)
class _Plan:
    """Everything a description needs, checked; its files lie in ``folder`` under ``_FILE_NAMES``."""

    name: str
    description: str
    authors: tuple[str, ...]
    license: str
    tags: tuple[str, ...]
    spatial_axes: str
    min_shape: tuple[int, ...]
    step: tuple[int, ...]
    halo: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    preprocessing: str | None
    output_activation: str | None
    weights: tuple[str, ...]
    architecture_file: str
    architecture_callable: str
    architecture_kwargs: dict[str, Any]
    cite_unet: bool
    folder: Path

    def parent_of(self, weight_format: str) -> str | None:
        return None if weight_format == self.weights[0] else self.weights[0]


def package_new_model(
    module: torch.nn.Module,
    out: str | Path,
    *,
    name: str,
    description: str = "A freshly built network packaged by bioadapt.",
    authors: Sequence[str] = ("bioadapt",),
    architecture_kwargs: Mapping[str, Any],
    architecture_source: str | Path | None = None,
    architecture_callable: str = "UNet",
    axes: str = "cyx",
    min_shape: Sequence[int] | None = None,
    step: Sequence[int] | None = None,
    halo: int = 0,
    preprocessing: Literal["zero_mean_unit_variance", "scale_range", None] = "zero_mean_unit_variance",
    output_activation: Literal["sigmoid", "softmax", None] = "sigmoid",
    output_names: Sequence[str] | None = None,
    weights: Sequence[str] = ("pytorch_state_dict", "torchscript"),
    test_input: np.ndarray | None = None,
    format_version: Literal["0.5", "0.4"] = "0.5",
    as_folder: bool = False,
    tags: Sequence[str] = (),
    license: str = "MIT",
) -> Path:
    """Write ``module`` as a bioimage.io model package (a ``.zip`` file, or a folder) and return its path.

    ``module`` must be built by ``architecture_callable`` in ``architecture_source`` (default: bioadapt's
    U-Net) with ``architecture_kwargs``; its ``state_dict()`` is the original weights entry when
    ``weights`` starts with ``pytorch_state_dict``, and the other formats are converted from the module
    (torchscript by scripting, onnx by export) with the first format as their parent. The input
    ``raw`` has axes ``b`` + ``axes``, spatial sizes ``min_shape + n * step``; the output ``prediction``
    has the input's spatial size (cropped by ``halo`` when blocking). Pre-processing normalises each
    sample per channel over the spatial axes; ``output_activation`` is declared as post-processing
    (the module itself outputs logits). The test output is computed by bioimageio.core on
    ``test_input`` (C, *spatial; default: a deterministic random image of about twice ``min_shape``).
    Nothing is left behind but the package. Raises BioadaptError for bad arguments.
    """
    spatial_axes = _spatial_axes(axes)
    dims = len(spatial_axes)
    if "dims" in architecture_kwargs and architecture_kwargs["dims"] != dims:
        raise BioadaptError(f"architecture_kwargs has dims={architecture_kwargs['dims']} but axes {axes!r} are "
                            f"{dims}D: use axes 'cyx' for 2D or 'czyx' for 3D networks")
    divisor = 2 ** int(architecture_kwargs.get("depth", 2))
    step = _per_axis(step, dims, "step", default=divisor)
    if not isinstance(halo, int) or halo < 0:
        raise BioadaptError(f"halo must be an integer >= 0, got {halo!r}")
    # The minimum must exceed twice the halo, or blocked prediction is left with nothing after cropping.
    default_min = [s * math.ceil(max(16, 2 * halo + 1) / s) for s in step]
    min_shape = _per_axis(min_shape, dims, "min_shape", default=default_min)
    if any(m <= 2 * halo for m in min_shape):
        raise BioadaptError(f"min_shape {min_shape} must exceed 2 * halo = {2 * halo} on every axis: "
                            "increase min_shape or reduce halo")
    weights = _weight_formats(weights)
    if preprocessing not in ("zero_mean_unit_variance", "scale_range", None):
        raise BioadaptError(f"unknown preprocessing {preprocessing!r}: use 'zero_mean_unit_variance', "
                            "'scale_range' or None")
    if output_activation not in ("sigmoid", "softmax", None):
        raise BioadaptError(f"unknown output_activation {output_activation!r}: use 'sigmoid', 'softmax' or None")
    if format_version not in ("0.5", "0.4"):
        raise BioadaptError(f"unknown format_version {format_version!r}: use '0.5' or '0.4'")
    if format_version == "0.4" and output_activation == "softmax":
        raise BioadaptError("format 0.4 has no softmax post-processing: use format_version='0.5', "
                            "or output_activation='sigmoid' or None")
    source = Path(architecture_source).resolve() if architecture_source is not None else DEFAULT_ARCHITECTURE
    if not source.is_file() or source.suffix != ".py":
        raise BioadaptError(f"architecture_source {str(source)!r} is not a Python file: pass the .py file that "
                            f"defines {architecture_callable!r}")
    if source.name in _FILE_NAMES.values():
        raise BioadaptError(f"architecture_source may not be named {source.name}: rename the file")
    out = Path(out)
    if as_folder and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BioadaptError(f"{out} exists and is not an empty folder: remove it or choose another path")
    if not as_folder and out.suffix != ".zip":
        raise BioadaptError(f"a zipped package needs a path ending in .zip, got {out}: rename it or pass "
                            "as_folder=True")

    in_channels = int(architecture_kwargs.get("in_channels", 1) if test_input is None else np.shape(test_input)[0])
    test_input = _test_input(test_input, in_channels, dims, min_shape, step)
    device = next(module.parameters(), torch.empty(0)).device
    example = torch.from_numpy(test_input[None]).to(device)
    out_channels = _output_channels(module, example)
    if output_names is None:
        output_names = tuple(f"channel{i}" for i in range(out_channels))
    output_names = _strings(output_names)
    if len(output_names) != out_channels:
        raise BioadaptError(f"output_names {output_names} has {len(output_names)} names but the network outputs "
                            f"{out_channels} channels: give one name per channel")

    with tempfile.TemporaryDirectory(prefix="bioadapt-package-") as tmp:
        folder = Path(tmp)
        plan = _Plan(name=name, description=description, authors=_strings(authors), license=license,
                     tags=_strings(tags), spatial_axes=spatial_axes, min_shape=min_shape, step=step, halo=halo,
                     input_names=tuple(f"channel{i}" for i in range(in_channels)), output_names=output_names,
                     preprocessing=preprocessing, output_activation=output_activation, weights=weights,
                     architecture_file=source.name, architecture_callable=architecture_callable,
                     architecture_kwargs=dict(architecture_kwargs), cite_unet=source == DEFAULT_ARCHITECTURE,
                     folder=folder)
        # 0.4 accepts only relative architecture paths, so every file lies next to the description.
        shutil.copyfile(source, folder / source.name)
        _write_weights(module, plan, example)
        np.save(folder / _FILE_NAMES["test_input"], test_input[None])
        # A placeholder of the right shape, replaced below by what bioimageio.core predicts.
        np.save(folder / _FILE_NAMES["test_output"], np.ones((1, out_channels, *test_input.shape[1:]), "float32"))
        (folder / _FILE_NAMES["documentation"]).write_text(_readme(plan), encoding="utf-8")
        prediction = _predict_test_output(_describe(plan, format_version), weights[0])
        if np.abs(prediction).max() < 1e-4:
            raise BioadaptError("the network's test output is all below 1e-4 in magnitude, which bioimage.io "
                                "rejects as untestable: declare an output_activation, or initialise the network "
                                "or choose a test_input so that it gives larger outputs")
        np.save(folder / _FILE_NAMES["test_output"], prediction)
        descr = _describe(plan, format_version)
        # With io checks on, validation writes cover images to temporary folders it never removes.
        with ValidationContext(perform_io_checks=False):
            if as_folder:
                save_bioimageio_package_as_folder(descr, output_path=out)
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                save_bioimageio_package(descr, output_path=out)
    with ValidationContext(perform_io_checks=False):
        written = load_description(out, format_version="discover")
    if isinstance(written, InvalidDescr):
        raise BioadaptError(f"the package written to {out} is invalid: {written.get_reason()}")
    return out


def _spatial_axes(axes: str) -> str:
    if axes not in ("cyx", "czyx"):
        raise BioadaptError(f"unknown axes {axes!r}: use 'cyx' (2D) or 'czyx' (3D); the batch axis is added "
                            "in front")
    return axes[1:]


def _per_axis(values: Sequence[int] | None, dims: int, what: str, default: int | Sequence[int]) -> tuple[int, ...]:
    if values is None:
        values = [default] * dims if isinstance(default, int) else default
    values = tuple(values)
    if len(values) != dims or not all(isinstance(v, (int, np.integer)) and v > 0 for v in values):
        raise BioadaptError(f"{what} must be {dims} positive integers (one per spatial axis), got {values}")
    return tuple(int(v) for v in values)


def _strings(values: str | Sequence[str]) -> tuple[str, ...]:
    """A lone string is one name, not a sequence of letters."""
    return (values,) if isinstance(values, str) else tuple(values)


def _weight_formats(weights: Sequence[str]) -> tuple[str, ...]:
    weights = _strings(weights)
    unknown = [w for w in weights if w not in WEIGHT_FORMATS]
    if unknown or not weights or len(set(weights)) != len(weights):
        raise BioadaptError(f"weights must be distinct names from {WEIGHT_FORMATS}, at least one, got {weights}")
    return weights


def _test_input(test_input: np.ndarray | None, in_channels: int, dims: int, min_shape: tuple[int, ...],
                step: tuple[int, ...]) -> np.ndarray:
    if test_input is None:
        shape = [m + s * math.ceil(m / s) for m, s in zip(min_shape, step)]  # a valid size near 2 * min
        return np.random.default_rng(0).random((in_channels, *shape), dtype=np.float32)
    test_input = np.asarray(test_input, dtype=np.float32)
    spatial = test_input.shape[1:]
    if test_input.ndim != dims + 1 or any(n < m or (n - m) % s for n, m, s in zip(spatial, min_shape, step)):
        raise BioadaptError(f"test_input has shape {test_input.shape}, but needs (channels, *spatial) with "
                            f"spatial sizes min_shape {min_shape} + n * step {step}")
    return test_input


@contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode (dropout off, batch-norm running stats) for export, then the caller's mode again."""
    was_training = module.training
    try:
        yield module.eval()
    finally:
        module.train(was_training)


def _output_channels(module: torch.nn.Module, example: torch.Tensor) -> int:
    """Run the module once to learn its output channels and check that it keeps the spatial size."""
    try:
        with _eval_mode(module), torch.no_grad():
            output = module(example)
    except Exception as error:
        raise BioadaptError(f"the module failed on a test input of shape {tuple(example.shape)}: {error}. "
                            "Check in_channels, axes, min_shape and step against the architecture") from error
    if output.ndim != example.ndim or output.shape[2:] != example.shape[2:]:
        raise BioadaptError(f"the module turned an input of shape {tuple(example.shape)} into "
                            f"{tuple(output.shape)}: a packaged output must keep the batch and spatial sizes")
    return int(output.shape[1])


def _write_weights(module: torch.nn.Module, plan: _Plan, example: torch.Tensor) -> None:
    with _eval_mode(module):
        if "pytorch_state_dict" in plan.weights:
            torch.save(module.state_dict(), plan.folder / _FILE_NAMES["pytorch_state_dict"])
        if "torchscript" in plan.weights:
            try:
                scripted = torch.jit.script(module)
            except Exception as error:
                warnings.warn(f"torch.jit.script failed ({error}); the torchscript weights are traced instead, "
                              "so data-dependent control flow is frozen and train() has no effect on them",
                              stacklevel=3)
                scripted = torch.jit.trace(module, example)
            scripted.save(str(plan.folder / _FILE_NAMES["torchscript"]))
        if "onnx" in plan.weights:
            dynamic = {0: "batch", **{2 + i: axis for i, axis in enumerate(plan.spatial_axes)}}
            torch.onnx.export(module, (example,), str(plan.folder / _FILE_NAMES["onnx"]), dynamo=False,
                              opset_version=ONNX_OPSET, input_names=["raw"], output_names=["prediction"],
                              dynamic_axes={"raw": dynamic, "prediction": dynamic})


def _predict_test_output(descr: v0_5.ModelDescr | v0_4.ModelDescr, weight_format: str) -> np.ndarray:
    """The test output as bioimageio.core computes it from the test input, in the description's axis order."""
    sample = get_test_input_sample(descr)
    with create_prediction_pipeline(descr, weights_format=weight_format) as pipeline:
        # test_model neither pads inputs nor crops output halos, so neither do we
        result = pipeline.predict_sample_without_blocking(sample, skip_input_padding=True, skip_output_cropping=True)
    output = result.members[next(iter(pipeline.output_ids))]
    return output.transpose([info.id for info in get_axes_infos(descr.outputs[0])]).data.to_numpy()


def _readme(plan: _Plan) -> str:
    spatial = ", ".join(f"{a}: {m} + n * {s}" for a, m, s in zip(plan.spatial_axes, plan.min_shape, plan.step))
    return (f"# {plan.name}\n\n{plan.description}\n\n"
            f"Packaged by bioadapt from a freshly built network `{plan.architecture_file}:"
            f"{plan.architecture_callable}` with kwargs `{plan.architecture_kwargs}`.\n\n"
            f"## Input `raw`\n\nAxes `bc{plan.spatial_axes}`, float32, channels {list(plan.input_names)}, "
            f"spatial sizes {spatial}. Pre-processing: {plan.preprocessing or 'none'} "
            "(per sample and channel, over the spatial axes).\n\n"
            f"## Output `prediction`\n\nSame spatial size as the input (halo {plan.halo}), channels "
            f"{list(plan.output_names)}. Post-processing: {plan.output_activation or 'none (raw logits)'}.\n\n"
            f"## Weights\n\n{', '.join(plan.weights)} (the first is the original, the others converted from it).\n\n"
            "## Validation\n\nThe test output was computed by bioimageio.core from the test input; "
            "`bioimageio test <package>` reproduces it. Packaging does not train the network.\n")


def _describe(plan: _Plan, format_version: str) -> v0_5.ModelDescr | v0_4.ModelDescr:
    """Build the description; its file sources are names relative to ``plan.folder``, as in the package."""
    describe = _describe_v0_5 if format_version == "0.5" else _describe_v0_4
    try:
        with ValidationContext(root=plan.folder, perform_io_checks=False):
            return describe(plan)
    except ValidationError as error:
        raise BioadaptError(f"the model description is invalid: {error}") from error


def _describe_v0_5(plan: _Plan) -> v0_5.ModelDescr:
    raw, spatial_ids = v0_5.TensorId("raw"), [v0_5.AxisId(a) for a in plan.spatial_axes]
    preprocessing: list[Any] = []
    if plan.preprocessing == "zero_mean_unit_variance":
        preprocessing.append(v0_5.ZeroMeanUnitVarianceDescr(kwargs=v0_5.ZeroMeanUnitVarianceKwargs(axes=spatial_ids)))
    elif plan.preprocessing == "scale_range":
        low, high = _SCALE_RANGE_PERCENTILES
        preprocessing.append(v0_5.ScaleRangeDescr(kwargs=v0_5.ScaleRangeKwargs(
            axes=spatial_ids, min_percentile=low, max_percentile=high)))
    postprocessing: list[Any] = []
    if plan.output_activation == "sigmoid":
        postprocessing.append(v0_5.SigmoidDescr())
    elif plan.output_activation == "softmax":
        postprocessing.append(v0_5.SoftmaxDescr(kwargs=v0_5.SoftmaxKwargs(axis=v0_5.AxisId("channel"))))

    def output_axis(axis_id: v0_5.AxisId) -> Any:
        size = v0_5.SizeReference(tensor_id=raw, axis_id=axis_id)
        if plan.halo:
            return v0_5.SpaceOutputAxisWithHalo(id=axis_id, size=size, halo=plan.halo)
        return v0_5.SpaceOutputAxis(id=axis_id, size=size)

    def file_descr(name: str) -> dict[str, Any]:
        return {"source": name, "sha256": get_sha256(plan.folder / name)}

    entries = _weight_entries(plan, v0_5, {"architecture": v0_5.ArchitectureFromFileDescr(
        **file_descr(plan.architecture_file), callable=v0_5.Identifier(plan.architecture_callable),
        kwargs=plan.architecture_kwargs)})

    return v0_5.ModelDescr(
        name=plan.name, description=plan.description, authors=[v0_5.Author(name=a) for a in plan.authors],
        cite=[v0_5.CiteEntry(text=_UNET_CITE[0], doi=v0_5.Doi(_UNET_CITE[1]))] if plan.cite_unet else [],
        license=plan.license, tags=list(plan.tags),
        documentation=v0_5.FileDescr(**file_descr(_FILE_NAMES["documentation"])),
        inputs=[v0_5.InputTensorDescr(
            id=raw, preprocessing=preprocessing,
            test_tensor=v0_5.FileDescr(**file_descr(_FILE_NAMES["test_input"])),
            axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=list(plan.input_names)),
                  *[v0_5.SpaceInputAxis(id=a, size=v0_5.ParameterizedSize(min=m, step=s))
                    for a, m, s in zip(spatial_ids, plan.min_shape, plan.step)]])],
        outputs=[v0_5.OutputTensorDescr(
            id=v0_5.TensorId("prediction"), postprocessing=postprocessing,
            test_tensor=v0_5.FileDescr(**file_descr(_FILE_NAMES["test_output"])),
            axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=list(plan.output_names)),
                  *[output_axis(a) for a in spatial_ids]])],
        weights=v0_5.WeightsDescr(**entries))


def _weight_entries(plan: _Plan, spec: Any, architecture: dict[str, Any]) -> dict[str, Any]:
    """Weight descriptions of ``spec`` (v0_5 or v0_4) for every format in the plan; ``architecture`` holds the
    state-dict entry's version-specific architecture fields."""
    entries: dict[str, Any] = {}
    for weight_format in plan.weights:
        name = _FILE_NAMES[weight_format]
        entry = {"source": name, "sha256": get_sha256(plan.folder / name), "parent": plan.parent_of(weight_format)}
        if weight_format == "pytorch_state_dict":
            entries[weight_format] = spec.PytorchStateDictWeightsDescr(
                **entry, **architecture, pytorch_version=spec.Version(torch.__version__))
        elif weight_format == "torchscript":
            entries[weight_format] = spec.TorchscriptWeightsDescr(
                **entry, pytorch_version=spec.Version(torch.__version__))
        else:
            entries[weight_format] = spec.OnnxWeightsDescr(**entry, opset_version=ONNX_OPSET)
    return entries


def _describe_v0_4(plan: _Plan) -> v0_4.ModelDescr:
    axes, n_spatial = "bc" + plan.spatial_axes, len(plan.spatial_axes)
    preprocessing: list[Any] = []
    if plan.preprocessing == "zero_mean_unit_variance":
        preprocessing.append(v0_4.ZeroMeanUnitVarianceDescr(kwargs=v0_4.ZeroMeanUnitVarianceKwargs(
            mode="per_sample", axes=plan.spatial_axes)))
    elif plan.preprocessing == "scale_range":
        low, high = _SCALE_RANGE_PERCENTILES
        preprocessing.append(v0_4.ScaleRangeDescr(kwargs=v0_4.ScaleRangeKwargs(
            mode="per_sample", axes=plan.spatial_axes, min_percentile=low, max_percentile=high)))
    postprocessing = [v0_4.SigmoidDescr()] if plan.output_activation == "sigmoid" else []

    entries = _weight_entries(plan, v0_4, {
        "architecture": f"{plan.architecture_file}:{plan.architecture_callable}",
        "architecture_sha256": get_sha256(plan.folder / plan.architecture_file), "kwargs": plan.architecture_kwargs})

    return v0_4.ModelDescr(
        name=plan.name, description=plan.description, authors=[v0_4.Author(name=a) for a in plan.authors],
        cite=[v0_4.CiteEntry(text=_UNET_CITE[0], doi=v0_4.Doi(_UNET_CITE[1]))] if plan.cite_unet else [],
        license=plan.license, tags=list(plan.tags), documentation=_FILE_NAMES["documentation"],
        timestamp=datetime.now(UTC),
        # spec 0.5.12 does not package 0.4's architecture file by itself; as an attachment it does.
        attachments=v0_4.AttachmentsDescr(files=[plan.architecture_file]),
        inputs=[v0_4.InputTensorDescr(
            name="raw", axes=axes, data_type="float32", preprocessing=preprocessing,
            description=f"channels {', '.join(plan.input_names)}",
            shape=v0_4.ParameterizedInputShape(min=[1, len(plan.input_names), *plan.min_shape],
                                               step=[0, 0, *plan.step]))],
        outputs=[v0_4.OutputTensorDescr(
            name="prediction", axes=axes, data_type="float32", postprocessing=postprocessing,
            description=f"channels {', '.join(plan.output_names)}",  # 0.4 has no channel names
            # 0.4's implicit shapes: scale 0 and offset n/2 give the channel axis a fixed size n
            shape=v0_4.ImplicitOutputShape(reference_tensor="raw", scale=[1.0, 0.0, *[1.0] * n_spatial],
                                           offset=[0, len(plan.output_names) / 2, *[0] * n_spatial]),
            halo=[0, 0, *[plan.halo] * n_spatial] if plan.halo else None)],
        test_inputs=[_FILE_NAMES["test_input"]], test_outputs=[_FILE_NAMES["test_output"]],
        weights=v0_4.WeightsDescr(**entries))
