"""A fine-tuned Cellpose 3 adapter as a bioimage.io package (format 0.5).

Input: the two channels Cellpose feeds its network (the channel to segment, and the nuclear channel or zeros),
with Cellpose's percentile normalisation declared as ``scale_range`` (1st-99th percentile per channel).
Network output: flow_y, flow_x and the cell-probability logit; the spec's ``cellpose_flow_dynamics``
post-processing (run by bioimageio.core through Cellpose) turns them into instance labels. The package runs at
the network's scale: images should be resized so cells are ``diam_mean`` pixels across (in ``config``).
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

from bioadapt.adapters.cellpose import GENERATION, CellposeAdapter
from bioadapt.errors import BioadaptError
from bioadapt.exporters.bioimageio_export import _save_and_test
from bioadapt.exporters.fresh import _predict_test_output
from bioadapt.exporters.metadata import Metadata, annotated_patch, write_cover

ARCHITECTURE = Path(__file__).with_name("cellpose_arch.py")
CELLPOSE_CITE = {"text": "Stringer, Wang, Michaelos, Pachitariu: Cellpose: a generalist algorithm for cellular "
                         "segmentation. Nature Methods 2021.", "doi": "10.1038/s41592-020-01018-x"}


def network_input(model: CellposeAdapter, image: np.ndarray) -> np.ndarray:
    """(C, Y, X) image -> the (2, Y, X) float32 channels the package takes (Cellpose's channel selection)."""
    from cellpose import transforms

    yxc = transforms.reshape(np.moveaxis(np.asarray(image, np.float32), 0, -1), channels=list(model.channels))
    return np.moveaxis(yxc, -1, 0).astype(np.float32)


def export_fine_tuned_cellpose(model: CellposeAdapter, out: Path, meta: Metadata, training: Mapping[str, Any],
                               as_folder: bool) -> Path:
    if GENERATION >= 4:
        raise BioadaptError("bioimage.io export of Cellpose 4 (CPSAM) models is not supported: its network is "
                            "not a CPnet; export a Cellpose 3 model")
    test_input = network_input(model, annotated_patch(model, training))
    shape = [16 + ((n - 16) // 8) * 8 for n in test_input.shape[1:]]
    if min(test_input.shape[1:]) < 16:
        raise BioadaptError(f"the test patch {test_input.shape[1:]} is smaller than 16 x 16")
    test_input = test_input[:, :shape[0], :shape[1]]
    with tempfile.TemporaryDirectory(prefix="bioadapt-export-") as tmp:
        folder = Path(tmp)
        torch.save(model.state_dict(), folder / "weights.pt")
        (folder / ARCHITECTURE.name).write_text(ARCHITECTURE.read_text())
        np.save(folder / "test_input.npy", test_input[None])
        np.save(folder / "test_output.npy", np.ones((1, 1, *shape), np.uint16))  # replaced before saving
        (folder / "README.md").write_text("pending\n")
        descr = _describe(model, folder, meta, training, covers=[])
        labels = _predict_test_output(descr, "pytorch_state_dict")
        if not labels.any():
            raise BioadaptError("the model finds no cells in the test patch, and bioimage.io rejects an all-zero test "
                                "output: pass training={'test_input': ...} with a patch where it finds cells")
        np.save(folder / "test_output.npy", labels)
        cover = write_cover(folder / "cover.png", test_input, (labels[0] > 0).astype(np.float32))
        (folder / "README.md").write_text(_readme(model, meta, training))
        descr = _describe(model, folder, meta, training, covers=[cover.name])
        return _save_and_test(descr, folder, out, as_folder)


def _describe(model: CellposeAdapter, folder: Path, meta: Metadata, training: Mapping[str, Any],
              covers: list[str]) -> v0_5.ModelDescr:
    net = model.net
    kwargs = {"nbase": [int(n) for n in net.nbase], "nout": int(net.nout), "sz": int(net.sz), "mkldnn": False,
              "max_pool": True, "diam_mean": float(net.diam_mean.item())}
    record = model.training_record
    params, result = (record.params, record.result) if record is not None else ({}, {})
    raw, y, x = v0_5.TensorId("raw"), v0_5.AxisId("y"), v0_5.AxisId("x")
    spatial = [y, x]

    def file(name: str) -> v0_5.FileDescr:
        return v0_5.FileDescr(source=name, sha256=get_sha256(folder / name))

    try:
        with ValidationContext(root=folder, perform_io_checks=False):
            return v0_5.ModelDescr(
                name=meta.name, description=meta.description, authors=[v0_5.Author(**a) for a in meta.authors],
                license=meta.license or "BSD-3-Clause", version=meta.version or "0.1.0",
                cite=[v0_5.CiteEntry(**c) for c in (meta.cite or (CELLPOSE_CITE,))],
                maintainers=[v0_5.Maintainer(**m) for m in meta.maintainers],
                tags=sorted(set(meta.tags) | {"bioadapt", "cellpose", "instance-segmentation"}),
                documentation=file("README.md"), covers=[file(c) for c in covers],
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
                inputs=[v0_5.InputTensorDescr(
                    id=raw, test_tensor=file("test_input.npy"),
                    preprocessing=[v0_5.ScaleRangeDescr(kwargs=v0_5.ScaleRangeKwargs(
                        axes=spatial, min_percentile=1.0, max_percentile=99.0))],
                    axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=["cytoplasm", "nucleus"]),
                          *[v0_5.SpaceInputAxis(id=a, size=v0_5.ParameterizedSize(min=16, step=8)) for a in spatial]])],
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
                        source=ARCHITECTURE.name, sha256=get_sha256(folder / ARCHITECTURE.name),
                        callable=v0_5.Identifier("CellposeFlows"), kwargs=kwargs))),
                config={"bioimageio": {"training": {k: v for k, v in {
                            "training_epochs": result.get("epochs_run"), "training_batch_size": params.get("batch_size"),
                            "initial_learning_rate": params.get("learning_rate"),
                            "loss_function": "Cellpose: MSE on flows x5 + BCE on cell probability",
                            "optimizer": "AdamW (cellpose.train.train_seg)",
                            "optimizer_kwargs": {"weight_decay": params.get("weight_decay")},
                            "training_duration": result.get("seconds")}.items() if v is not None}},
                        "bioadapt": {"parent_source": model.source, "cellpose_version": GENERATION,
                                     "channels": list(model.channels), "diam_mean": kwargs["diam_mean"],
                                     "diam_labels": float(net.diam_labels.item()),
                                     "regions": [dict(r) for r in training.get("regions", [])],
                                     "label_store": training.get("label_store"),
                                     "fine_tune": {"params": params, "epochs_run": result.get("epochs_run")},
                                     "metrics": dict(training.get("metrics", {}))}},
            )
    except ValidationError as e:
        raise BioadaptError(f"the exported Cellpose description is invalid: {e}") from e


def _readme(model: CellposeAdapter, meta: Metadata, training: Mapping[str, Any]) -> str:
    record = model.training_record
    params, result = (record.params, record.result) if record is not None else ({}, {})
    net = model.net
    regions = training.get("regions", [])
    lines = [f"# {meta.name}", "", meta.description, "",
             f"A Cellpose {GENERATION} network fine-tuned with bioadapt from `{model.source}` through "
             "`cellpose.train.train_seg`.", "",
             "## Using it", "",
             f"- Input: 2 channels, Cellpose's channels {list(model.channels)} (the channel to segment, then the "
             "nuclear channel or zeros), normalised to the 1st-99th percentile per channel (`scale_range`).",
             f"- Scale: cells should be about {float(net.diam_mean.item()):.0f} pixels across (`diam_mean`); the "
             f"training cells measured {float(net.diam_labels.item()):.1f} (`diam_labels`). Resize images first; "
             "Cellpose itself does this from the `diameter` setting.",
             "- Network output: flow_y, flow_x (x5) and the cell-probability logit. The `cellpose_flow_dynamics` "
             "post-processing (Cellpose's `dynamics.compute_masks`, flow threshold "
             f"{model.flow_threshold}, cell-probability threshold {model.cellprob_threshold}) turns them into "
             "instance labels (uint16).",
             "- The weights are Cellpose's own CPnet state dict: `CellposeModel(pretrained_model=...)` loads a "
             "`torch.save` of them in Cellpose 3.", "",
             "## Training", "",
             f"- epochs: {result.get('epochs_run')}, learning rate {params.get('learning_rate')} (train_seg warms "
             f"up from 0 over the first 10 epochs), batch size {params.get('batch_size')}, weight decay "
             f"{params.get('weight_decay')}",
             f"- patches: {result.get('n_train')} for training, {result.get('n_val')} held out", ""]
    if training.get("metrics"):
        lines += ["## Metrics", ""] + [f"- {k}: {v}" for k, v in training["metrics"].items()] + [""]
    lines += ["## Training regions", ""]
    lines += [f"- `{r.get('image')}` origin {r.get('origin')} shape {r.get('shape')}" for r in regions] or \
        ["- not recorded"]
    if training.get("label_store"):
        lines += ["", f"Corrected labels: `{training['label_store']}` (OME-Zarr label image)."]
    return "\n".join(lines) + "\n"
