"""A fine-tuned bioimage.io adapter as a new, valid bioimage.io package (format 0.5).

The parent's description is kept (inputs, outputs, axes, pre- and post-processing, architecture); what changes
is what must: weights, test tensors (a real annotated patch run through bioimageio.core's pipeline), covers,
documentation, name/authors/version, the parent link and the provenance in ``config``. Everything is written
to a temporary folder, validated and tested with bioimageio.core, and only then moved to ``out``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bioimageio.spec import ValidationContext, save_bioimageio_package, save_bioimageio_package_as_folder
from bioimageio.spec.model import v0_5
from bioimageio.spec.utils import get_sha256
from pydantic import ValidationError

from bioadapt.adapters.bioimageio import BioimageioAdapter
from bioadapt.errors import BioadaptError
from bioadapt.exporters.fresh import _predict_test_output
from bioadapt.exporters.metadata import Metadata, annotated_patch, bump_version, write_cover
from bioadapt.exporters.readme import training_sections

TOLERANCE = 1e-4  # torchscript re-export must reproduce the state-dict module's outputs to this


def export_fine_tuned_bioimageio(model: BioimageioAdapter, out: Path, meta: Metadata,
                                 training: Mapping[str, Any], as_folder: bool) -> Path:
    lay = model.layout
    test_input = _test_patch(model, training)
    with tempfile.TemporaryDirectory(prefix="bioadapt-export-") as tmp:
        folder = Path(tmp) / "package"
        folder.mkdir()
        weights = _write_weights(model, folder, model.network_input(test_input))
        np.save(folder / "test_input.npy", lay.to_model(test_input[None]).astype(_declared_dtype(lay.input)))
        np.save(folder / "test_output.npy", np.zeros(1, np.float32))  # replaced below, before anything is saved
        (folder / "README.md").write_text("pending\n")
        descr = _describe(model, folder, weights, meta, training, covers=[])
        first_format = next(iter(weights))
        output = _predict_test_output(descr, first_format)
        if np.abs(output).max() < 1e-4:
            raise BioadaptError("the fine-tuned model's test output is all below 1e-4 on the annotated patch; "
                                "bioimage.io rejects such packages: check the training result")
        np.save(folder / "test_output.npy", output.astype(np.float32))
        probabilities = model.predict_proba(test_input[None])[0]
        cover = write_cover(folder / "cover.png", test_input, probabilities)
        (folder / "README.md").write_text(_readme(model, meta, training, weights))
        descr = _describe(model, folder, weights, meta, training, covers=[cover.name])
        return _save_and_test(descr, folder, out, as_folder)


def _test_patch(model: BioimageioAdapter, training: Mapping[str, Any]) -> np.ndarray:
    """A real annotated patch of a valid input shape (cropped to the largest that fits in it, or mirrored up to
    the smallest that holds it), with the values the description's input dtype can hold: (C, *spatial) float32."""
    patch = annotated_patch(model, training)
    grid = model.layout.grid
    spatial = patch.shape[1:]
    smaller = any(n < s for n, s in zip(spatial, grid.smallest))
    shape = (grid.at_least(spatial) if smaller else None) or grid.at_most(spatial)
    patch = np.pad(patch, [(0, 0)] + [(0, max(0, s - n)) for s, n in zip(shape, spatial)], mode="symmetric")
    patch = patch[(slice(None), *[slice(0, s) for s in shape])]
    return _representable(patch, _declared_dtype(model.layout.input)).astype(np.float32)


def _declared_dtype(tensor: Any) -> np.dtype:
    data = tensor.data[0] if isinstance(tensor.data, (list, tuple)) else tensor.data
    return np.dtype(str(data.type))


def _representable(patch: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``patch`` as ``dtype``: rounded where its values lie in the dtype's range, else stretched over it."""
    if not np.issubdtype(dtype, np.integer):
        return patch.astype(dtype)
    info = np.iinfo(dtype)
    if patch.min() >= info.min and patch.max() <= info.max:
        return np.round(patch).astype(dtype)
    low, high = float(patch.min()), float(patch.max())
    return np.round((patch - low) / max(high - low, 1e-12) * (float(info.max) - info.min) + info.min).astype(dtype)


def _write_weights(model: BioimageioAdapter, folder: Path, example: torch.Tensor) -> dict[str, str]:
    """Weight files of the adapted model: {format: file name}; the first has no parent."""
    parent_weights = model.description.weights
    files: dict[str, str] = {}
    module = model.module
    if isinstance(module, torch.jit.ScriptModule):
        torch.jit.save(module, str(folder / "weights_torchscript.pt"))
        return {"torchscript": "weights_torchscript.pt"}
    torch.save(model.state_dict(), folder / "weights.pt")
    files["pytorch_state_dict"] = "weights.pt"
    architecture = parent_weights.pytorch_state_dict.architecture
    if isinstance(architecture, v0_5.ArchitectureFromFileDescr):
        name = Path(str(architecture.source)).name
        (folder / name).write_bytes(architecture.get_reader().read())
    if parent_weights.torchscript is not None:
        try:
            scripted = _script(module, example)
            files["torchscript"] = "weights_torchscript.pt"
            torch.jit.save(scripted, str(folder / "weights_torchscript.pt"))
        except BioadaptError as e:
            warnings.warn(f"the parent had torchscript weights but they cannot be produced honestly: {e}; "
                          "the package carries pytorch_state_dict only", stacklevel=3)
    return files


def _script(module: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """TorchScript of the module, checked to reproduce it on ``example`` (scripting can change a forward)."""
    was_training = module.training
    module.eval()
    try:
        scripted = torch.jit.script(module)
        with torch.no_grad():
            difference = float((scripted(example) - module(example)).abs().max())
    except Exception as e:  # torch raises many kinds here (NotSupportedError, RuntimeError, ...)
        raise BioadaptError(f"torch.jit.script failed ({type(e).__name__}: {e})") from e
    finally:
        module.train(was_training)
    if difference > TOLERANCE:
        raise BioadaptError(f"the scripted module differs from the original by {difference:.3g}")
    return scripted


def _describe(model: BioimageioAdapter, folder: Path, weights: Mapping[str, str], meta: Metadata,
              training: Mapping[str, Any], covers: Sequence[str]) -> v0_5.ModelDescr:
    parent = model.description
    data = json.loads(parent.model_dump_json(exclude_none=True, exclude_unset=True))

    def file(name: str) -> dict[str, Any]:
        return {"source": name, "sha256": get_sha256(folder / name)}

    data["inputs"][0]["test_tensor"] = file("test_input.npy")
    data["outputs"][0]["test_tensor"] = file("test_output.npy")
    for tensor in data["inputs"] + data["outputs"]:
        tensor.pop("sample_tensor", None)
    data["outputs"] = data["outputs"][:1]  # bioadapt trains and tests the first output only
    new_weights: dict[str, Any] = {}
    first = next(iter(weights))
    for fmt, name in weights.items():
        entry = dict(data["weights"].get(fmt) or {}) if fmt in data["weights"] else {}
        entry.update(file(name), parent=None if fmt == first else first, pytorch_version=torch.__version__)
        entry.pop("authors", None)
        entry.pop("dependencies", None)  # the parent's environment file; these weights come from this torch
        if fmt == "pytorch_state_dict":
            arch = entry["architecture"]
            if "source" in arch:
                arch.update(file(Path(str(arch["source"])).name))
        new_weights[fmt] = entry
    data["weights"] = new_weights
    data.update(
        name=meta.name, description=meta.description, authors=list(meta.authors),
        license=meta.license or parent.license, version=meta.version or bump_version(parent.version),
        cite=list(meta.cite) or data.get("cite", []), tags=sorted(set(meta.tags or data.get("tags", [])) | {"bioadapt"}),
        documentation=file("README.md"), covers=[file(c) for c in covers], attachments=[],
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
        config=_config(data.get("config", {}), model, training),
    )
    for key in ("id", "id_emoji", "uploader", "maintainers", "packaged_by", "version_comment"):
        data.pop(key, None)
    if meta.maintainers:
        data["maintainers"] = list(meta.maintainers)
    data["parent"] = {"id": str(parent.id), **({"version": str(parent.version)} if parent.version else {})} \
        if parent.id else None
    if data["parent"] is None:
        data.pop("parent")
    try:
        with ValidationContext(root=folder, perform_io_checks=False):
            return v0_5.ModelDescr.model_validate(data)
    except ValidationError as e:
        raise BioadaptError(f"the exported description is invalid: {e}") from e


def _config(parent_config: Mapping[str, Any], model: BioimageioAdapter, training: Mapping[str, Any]) -> dict:
    params, result = _training(model)
    config = dict(parent_config)
    bioimageio = dict(config.get("bioimageio", {}))
    bioimageio["training"] = {k: v for k, v in {
        "training_epochs": result.get("epochs_run"), "training_batch_size": params.get("batch_size"),
        "initial_learning_rate": params.get("learning_rate"),
        "loss_function": "BCE + Dice" if model.output_kind == "sigmoid" else "CE + Dice",
        "optimizer": "AdamW", "optimizer_kwargs": {"weight_decay": params.get("weight_decay")},
        "training_duration": result.get("seconds"),
    }.items() if v is not None}
    config["bioimageio"] = bioimageio
    config["bioadapt"] = {
        "parent_source": model.source,
        "parent_id": str(model.description.id) if model.description.id else None,
        "regions": [dict(r) for r in training.get("regions", [])],
        "label_store": training.get("label_store"),
        "fine_tune": {"params": params, "best_epoch": result.get("best_epoch"),
                      "initial_val_score": result.get("initial_val_score"),
                      "best_val_score": result.get("best_val_score"), "n_train": result.get("n_train"),
                      "n_val": result.get("n_val")},
        "metrics": dict(training.get("metrics", {})),
        "learning_curve": [dict(r) for r in training.get("learning_curve", [])],
    }
    return config


_VAL_METRIC_NAMES = {"dice": "Dice", "f1": "F1 at IoU 0.5"}


def _readme(model: BioimageioAdapter, meta: Metadata, training: Mapping[str, Any], weights: Mapping[str, str]) -> str:
    params, result = _training(model)
    parent = f"**{model.description.name}** (`{model.source}`" + (
        f", zoo id `{model.description.id}`" if model.description.id else "") + ")"
    if model.training_record is None:  # the parent's own weights
        lines = [f"# {meta.name}", "", meta.description, "", f"Packaged with bioadapt from {parent}, not fine-tuned.",
                 ""]
    else:
        lines = [f"# {meta.name}", "", meta.description, "", f"Fine-tuned with bioadapt from {parent}.", "",
                 "## Training", "",
                 f"- epochs run: {result.get('epochs_run')}, best epoch: {result.get('best_epoch')}",
                 f"- learning rate: {params.get('learning_rate')}, batch size: {params.get('batch_size')}, "
                 f"optimizer: AdamW (weight decay {params.get('weight_decay')})",
                 f"- loss: {'BCE + Dice' if model.output_kind == 'sigmoid' else 'CE + Dice'}",
                 f"- held-out {_VAL_METRIC_NAMES[result.get('val_metric') or 'dice']}: "
                 f"{result.get('initial_val_score')} before, {result.get('best_val_score')} after",
                 f"- patches: {result.get('n_train')} for training, {result.get('n_val')} held out", ""]
    lines += training_sections(training, fine_tuned=model.training_record is not None)
    lines += ["", f"Weights: {', '.join(weights)}. Pre- and post-processing are the parent's.", ""]
    return "\n".join(lines)


def _save_and_test(descr: v0_5.ModelDescr, folder: Path, out: Path, as_folder: bool) -> Path:
    from bioimageio.core import test_model

    staging = Path(tempfile.mkdtemp(prefix="bioadapt-staging-", dir=out.parent))
    try:
        target = staging / (out.name if not as_folder else "package")
        with ValidationContext(root=folder, perform_io_checks=False):
            if as_folder:
                save_bioimageio_package_as_folder(descr, output_path=target)
            else:
                save_bioimageio_package(descr, output_path=target)
        summary = test_model(target)
        if summary.status != "passed":
            failed = [f"{d.name}: {'; '.join(e.msg for e in d.errors)}" for d in summary.details
                      if d.status == "failed" or d.errors]
            raise BioadaptError(f"the exported package did not pass bioimageio.core's model test "
                                f"({summary.status}): {' | '.join(failed)[:1500]}")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        shutil.move(str(target), str(out))
        return out
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _training(model: BioimageioAdapter) -> tuple[dict[str, Any], dict[str, Any]]:
    record = model.training_record
    return (record.params, record.result) if record is not None else ({}, {})
