"""A fine-tuned Cellpose adapter (Cellpose 3 or 4) as a bioimage.io package (format 0.5).

Input: the channels Cellpose feeds its network (Cellpose 3: the channel to segment and the nuclear channel or
zeros; Cellpose 4: the image's first 3 channels, zeros where it has fewer), with Cellpose's percentile
normalisation declared as ``scale_range`` (1st-99th percentile per channel). Weights: the network's state dict
(Cellpose's own file format) with an architecture file built on Cellpose's classes (``cellpose_arch.py``, a
CPnet, for Cellpose 3; ``bioadapt/adapters/cpsam.py``, a CPSAM, for Cellpose 4). Network output: flow_y, flow_x
and the cell-probability logit; the spec's ``cellpose_flow_dynamics`` post-processing (run by bioimageio.core
through Cellpose) turns them into instance labels.

What the bioimage.io spec (0.5) cannot express, so consumers must do it themselves (the package's README says so):
- the diameter: Cellpose resizes images so cells are ``diam_mean`` pixels across (30 for Cellpose 4) before the
  network and resizes the flows back; the spec has no resize step, so the package runs at the network's scale;
- Cellpose 4's tiling: CPSAM takes exactly 256 x 256 (its position embedding), so the input axes are fixed at
  256; Cellpose's eval cuts larger images into overlapping 256 tiles and blends them, which the spec cannot say;
- the number of flow-dynamics steps (Cellpose's eval uses 200 / rescale; the spec's op always 200).
Cellpose itself loads ``weights.pt`` as it is (``CellposeModel(pretrained_model=...)``): that is the
Cellpose-native export inside the same package.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bioimageio.spec import ValidationContext
from bioimageio.spec.model import v0_5
from bioimageio.spec.utils import get_sha256
from pydantic import ValidationError

from bioadapt.adapters.cellpose import CPSAM_TILE, CellposeAdapter
from bioadapt.adapters.shapes import pad_to
from bioadapt.errors import BioadaptError
from bioadapt.exporters.bioimageio_export import _save_and_test
from bioadapt.exporters.fresh import _predict_test_output
from bioadapt.exporters.metadata import Metadata, annotated_patch, write_cover
from bioadapt.exporters.readme import training_sections

CELLPOSE3_ARCHITECTURE = Path(__file__).with_name("cellpose_arch.py")
CPSAM_ARCHITECTURE = Path(__file__).resolve().parent.parent / "adapters" / "cpsam.py"
CELLPOSE_CITE = {"text": "Stringer, Wang, Michaelos, Pachitariu: Cellpose: a generalist algorithm for cellular "
                         "segmentation. Nature Methods 2021.", "doi": "10.1038/s41592-020-01018-x"}
CPSAM_CITE = {"text": "Pachitariu, Rariden, Stringer: Cellpose-SAM: superhuman generalization for cellular "
                      "segmentation. bioRxiv 2025.", "doi": "10.1101/2025.04.28.651001"}


def _architecture(model: CellposeAdapter) -> tuple[Path, str]:
    """(architecture file, callable) of the package: Cellpose's own network classes, output map only."""
    if model.generation >= 4:
        return CPSAM_ARCHITECTURE, "CellposeSAMFlows"
    return CELLPOSE3_ARCHITECTURE, "CellposeFlows"


def _test_input(model: CellposeAdapter, training: Mapping[str, Any]) -> np.ndarray:
    """The network's channels of a real annotated patch, (C, Y, X) at a size the package takes: Cellpose 3
    crops to 16 + 8k; Cellpose 4 crops or pads to 256 x 256 (mirrored, as the adapter pads)."""
    image = model.network_input(annotated_patch(model, training))
    if model.generation >= 4:
        image = image[:, :CPSAM_TILE, :CPSAM_TILE]
        return pad_to(torch.from_numpy(image)[None], (CPSAM_TILE, CPSAM_TILE), (0, 0))[0].numpy()
    if min(image.shape[1:]) < 16:
        raise BioadaptError(f"the test patch {image.shape[1:]} is smaller than 16 x 16")
    shape = [16 + ((n - 16) // 8) * 8 for n in image.shape[1:]]
    return image[:, :shape[0], :shape[1]]


def export_fine_tuned_cellpose(model: CellposeAdapter, out: Path, meta: Metadata, training: Mapping[str, Any],
                               as_folder: bool) -> Path:
    test_input = _test_input(model, training)
    architecture, _ = _architecture(model)
    with tempfile.TemporaryDirectory(prefix="bioadapt-export-") as tmp:
        folder = Path(tmp)
        torch.save(model.state_dict(), folder / "weights.pt")
        (folder / architecture.name).write_text(architecture.read_text())
        np.save(folder / "test_input.npy", test_input[None])
        np.save(folder / "test_output.npy", np.ones((1, 1, *test_input.shape[1:]), np.uint16))  # replaced below
        (folder / "README.md").write_text("pending\n")
        descr = _describe(model, folder, meta, training, covers=[], test_shape=test_input.shape)
        labels = _predict_test_output(descr, "pytorch_state_dict")
        if not labels.any():
            raise BioadaptError("the model finds no cells in the test patch, and bioimage.io rejects an all-zero test "
                                "output: pass training={'test_input': ...} with a patch where it finds cells")
        np.save(folder / "test_output.npy", labels)
        cover = write_cover(folder / "cover.png", test_input, (labels[0] > 0).astype(np.float32))
        (folder / "README.md").write_text(_readme(model, meta, training))
        descr = _describe(model, folder, meta, training, covers=[cover.name], test_shape=test_input.shape)
        return _save_and_test(descr, folder, out, as_folder)


def _input_axes(model: CellposeAdapter, channels: int) -> list[Any]:
    spatial = [v0_5.AxisId("y"), v0_5.AxisId("x")]
    if model.generation >= 4:
        names = [f"channel{i}" for i in range(channels)]
        sizes: list[Any] = [CPSAM_TILE, CPSAM_TILE]
    else:
        names = ["cytoplasm", "nucleus"]
        sizes = [v0_5.ParameterizedSize(min=16, step=8)] * 2
    return [v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=names),
            *[v0_5.SpaceInputAxis(id=a, size=s) for a, s in zip(spatial, sizes)]]


def _describe(model: CellposeAdapter, folder: Path, meta: Metadata, training: Mapping[str, Any],
              covers: list[str], test_shape: tuple[int, ...]) -> v0_5.ModelDescr:
    architecture, callable_name = _architecture(model)
    kwargs = model.network_kwargs()
    record = model.training_record
    params, result = (record.params, record.result) if record is not None else ({}, {})
    raw, spatial = v0_5.TensorId("raw"), [v0_5.AxisId("y"), v0_5.AxisId("x")]
    cite = CPSAM_CITE if model.generation >= 4 else CELLPOSE_CITE

    def file(name: str) -> v0_5.FileDescr:
        return v0_5.FileDescr(source=name, sha256=get_sha256(folder / name))

    try:
        with ValidationContext(root=folder, perform_io_checks=False):
            return v0_5.ModelDescr(
                name=meta.name, description=meta.description, authors=[v0_5.Author(**a) for a in meta.authors],
                license=meta.license or "BSD-3-Clause", version=meta.version or "0.1.0",
                cite=[v0_5.CiteEntry(**c) for c in (meta.cite or (cite,))],
                maintainers=[v0_5.Maintainer(**m) for m in meta.maintainers],
                tags=sorted(set(meta.tags) | {"bioadapt", "cellpose", "instance-segmentation"}),
                documentation=file("README.md"), covers=[file(c) for c in covers],
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
                inputs=[v0_5.InputTensorDescr(
                    id=raw, test_tensor=file("test_input.npy"),
                    preprocessing=[v0_5.ScaleRangeDescr(kwargs=v0_5.ScaleRangeKwargs(
                        axes=spatial, min_percentile=1.0, max_percentile=99.0))],
                    axes=_input_axes(model, test_shape[0]))],
                outputs=[v0_5.OutputTensorDescr(
                    id=v0_5.TensorId("labels"), test_tensor=file("test_output.npy"),
                    data=v0_5.IntervalOrRatioDataDescr(type="uint16"),
                    postprocessing=[v0_5.CellposeFlowDynamicsDescr(kwargs=v0_5.CellposeFlowDynamicsKwargs(
                        cellprob_threshold=model.cellprob_threshold, flow_threshold=model.flow_threshold,
                        do_3D=False, min_size=max(model.min_size, 0)))],
                    axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=["labels"]),  # after the flow dynamics
                          *[v0_5.SpaceOutputAxis(id=a, size=v0_5.SizeReference(tensor_id=raw, axis_id=a))
                            for a in spatial]])],
                weights=v0_5.WeightsDescr(pytorch_state_dict=v0_5.PytorchStateDictWeightsDescr(
                    source="weights.pt", sha256=get_sha256(folder / "weights.pt"),
                    pytorch_version=v0_5.Version(torch.__version__),
                    architecture=v0_5.ArchitectureFromFileDescr(
                        source=architecture.name, sha256=get_sha256(folder / architecture.name),
                        callable=v0_5.Identifier(callable_name), kwargs=kwargs))),
                config={"bioimageio": {"training": {k: v for k, v in {
                            "training_epochs": result.get("epochs_run"), "training_batch_size": params.get("batch_size"),
                            "initial_learning_rate": params.get("learning_rate"),
                            "loss_function": "Cellpose: MSE on flows x5 + BCE on cell probability",
                            "optimizer": "AdamW (cellpose.train.train_seg)",
                            "optimizer_kwargs": {"weight_decay": params.get("weight_decay")},
                            "training_duration": result.get("seconds")}.items() if v is not None}},
                        "bioadapt": {"parent_source": model.source, "cellpose_version": model.generation,
                                     "channels": list(model.channels), "diam_mean": model.diam_mean,
                                     "diam_labels": model.diam_labels, "rescale": model.rescale(),
                                     "regions": [dict(r) for r in training.get("regions", [])],
                                     "label_store": training.get("label_store"),
                                     "fine_tune": {"params": params, "epochs_run": result.get("epochs_run")},
                                     "metrics": dict(training.get("metrics", {})),
                                     "learning_curve": [dict(r) for r in training.get("learning_curve", [])]}},
            )
    except ValidationError as e:
        raise BioadaptError(f"the exported Cellpose description is invalid: {e}") from e


def _usage(model: CellposeAdapter) -> list[str]:
    """The README's "Using it" lines: what the package expects and what it leaves to the consumer."""
    if model.generation < 4:
        return [
            f"- Input: 2 channels, Cellpose's channels {list(model.channels)} (the channel to segment, then the "
            "nuclear channel or zeros), normalised to the 1st-99th percentile per channel (`scale_range`).",
            f"- Scale: cells should be about {model.diam_mean:.0f} pixels across (`diam_mean`); the training cells "
            f"measured {model.diam_labels:.1f} (`diam_labels`). Resize images first; Cellpose itself does this from "
            "the `diameter` setting (bioimage.io has no resize step).",
            "- The weights are Cellpose's own CPnet state dict: Cellpose 3's `CellposeModel(pretrained_model=...)` "
            "loads `weights.pt` as it is."]
    return [
        "- Input: the image's first 3 channels (zeros where it has fewer), normalised to the 1st-99th percentile "
        "per channel (`scale_range`), exactly 256 x 256 pixels: Cellpose-SAM's position embedding fixes the size. "
        "Cut larger images into 256 x 256 tiles yourself (Cellpose's eval uses overlapping tiles and blends them; "
        "bioimage.io cannot describe that).",
        f"- Scale: Cellpose 4 resizes images by 30 / diameter when given a diameter, and not at all otherwise; "
        f"this package runs at the network's scale (no resize step in bioimage.io). The training cells measured "
        f"{model.diam_labels:.1f} pixels (`diam_labels`, which Cellpose 4 does not use).",
        "- The weights are Cellpose-SAM's own state dict: Cellpose 4's `CellposeModel(pretrained_model=...)` loads "
        "`weights.pt` as it is when the encoder is ViT-L (the architecture's defaults); `cpsam.py` rebuilds "
        "any other encoder size with Cellpose's classes (it needs cellpose>=4 and segment_anything)."]


def _readme(model: CellposeAdapter, meta: Metadata, training: Mapping[str, Any]) -> str:
    record = model.training_record
    params, result = (record.params, record.result) if record is not None else ({}, {})
    lines = [f"# {meta.name}", "", meta.description, "",
             f"A Cellpose {model.generation} network fine-tuned with bioadapt from `{model.source}` through "
             "`cellpose.train.train_seg`.", "",
             "## Using it", "", *_usage(model),
             "- Network output: flow_y, flow_x (x5) and the cell-probability logit. The `cellpose_flow_dynamics` "
             "post-processing (Cellpose's `dynamics.compute_masks`, 200 steps, flow threshold "
             f"{model.flow_threshold}, cell-probability threshold {model.cellprob_threshold}) turns them into "
             "instance labels (uint16).", "",
             "## Training", "",
             f"- epochs: {result.get('epochs_run')}, learning rate {params.get('learning_rate')} (train_seg warms "
             f"up from 0 over the first 10 epochs), batch size {params.get('batch_size')}, weight decay "
             f"{params.get('weight_decay')}",
             f"- patches: {result.get('n_train')} for training, {result.get('n_val')} held out", ""]
    lines += training_sections(training, fine_tuned=True)
    return "\n".join(lines) + "\n"
