"""Any bioimage.io model (format 0.4 or 0.5) behind the adapter interface.

bioimageio.core loads the description and the weights and runs the model's own pre- and post-processing.
Torch weights (pytorch_state_dict, torchscript) run through the torch module itself, so passes can be batched,
made stochastic and trained; onnx and tensorflow weights run through bioimageio.core's model adapters and are
inference-only.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from dataclasses import asdict
from typing import Any, TypeVar

import numpy as np
import torch
from bioimageio.core.proc_ops import Sigmoid, Softmax
from bioimageio.core.proc_setup import setup_pre_and_postprocessing
from bioimageio.core.sample import Sample
from bioimageio.core.tensor import Tensor
from bioimageio.spec.model import v0_5
from torch import nn

from bioadapt.adapters.allocator import tune_malloc
from bioadapt.adapters.base import (Adapter, FineTuneParams, FineTuneResult, ModelInfo, Progress, Stop,
                                    check_images, check_samples)
from bioadapt.adapters.dropout import CommonMasks, DropoutKind, HeadSplit, MCDropout, stacked_passes
from bioadapt.adapters.segmentation import labels_from_probabilities
from bioadapt.adapters.shapes import activation_bytes, crop_from, default_memory_budget, pad_to, valid_shape
from bioadapt.adapters.sources import load_model_description
from bioadapt.adapters.targets import dice_score, loss, make_targets
from bioadapt.adapters.training import fit
from bioadapt.errors import BioadaptError

log = logging.getLogger(__name__)

TRAINABLE_FORMATS = ("pytorch_state_dict", "torchscript")
INFERENCE_FORMATS = ("onnx", "tensorflow_saved_model_bundle", "keras_hdf5", "tensorflow_js")
SPATIAL = ("z", "y", "x")
Array = TypeVar("Array", np.ndarray, torch.Tensor)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BioadaptError(f"device {device} was asked for but torch sees no CUDA GPU; use device='cpu' or 'auto'")
    return device


class _Layout:
    """Where a model's axes sit, and how our (B, C, [Z], Y, X) arrays map onto them."""

    def __init__(self, descr: v0_5.ModelDescr):
        if len(descr.inputs) != 1:
            raise BioadaptError(f"{descr.name} has {len(descr.inputs)} inputs; bioadapt adapts single-input models")
        self.input = descr.inputs[0]
        self.output = descr.outputs[0]
        if len(descr.outputs) > 1:
            log.info("%s has %d outputs; bioadapt uses the first, %r", descr.name, len(descr.outputs), self.output.id)
        in_ids = [str(a.id) for a in self.input.axes]
        out_ids = [str(a.id) for a in self.output.axes]
        for ids, what in ((in_ids, "input"), (out_ids, "output")):
            odd = [i for i in ids if i not in ("batch", "channel") + SPATIAL]
            if odd:
                raise BioadaptError(f"{descr.name}'s {what} has axes {odd}: bioadapt handles batch, channel, z, y, x")
        self.spatial = tuple(a for a in SPATIAL if a in in_ids)
        if tuple(a for a in SPATIAL if a in out_ids) != self.spatial:
            raise BioadaptError(f"{descr.name} maps spatial axes {self.spatial} to {out_ids}; bioadapt needs outputs "
                                "on the input's grid")
        if "batch" not in in_ids or "batch" not in out_ids:
            raise BioadaptError(f"{descr.name} has no batch axis; bioadapt batches patches and needs one")
        self.in_ids, self.out_ids = in_ids, out_ids
        self.canonical = ["batch", "channel", *self.spatial]
        self.input_channels = self._channels(self.input)
        self.output_channels = self._channels(self.output)
        self.class_names = tuple(self._channel_names(self.output))
        self.min_shape, self.step = self._sizes(descr)
        self.halo = tuple(int(getattr(a, "halo", 0) or 0) for a in self.output.axes if str(a.id) in self.spatial)
        self.axes = "c" + "".join(self.spatial)

    @staticmethod
    def _channels(tensor: Any) -> int:
        for a in tensor.axes:
            if str(a.id) == "channel":
                return len(a.channel_names)
        return 1

    @staticmethod
    def _channel_names(tensor: Any) -> list[str]:
        for a in tensor.axes:
            if str(a.id) == "channel":
                return [str(n) for n in a.channel_names]
        return [str(tensor.id)]

    def _sizes(self, descr: v0_5.ModelDescr) -> tuple[tuple[int, ...], tuple[int, ...]]:
        mins, steps = [], []
        for a in self.input.axes:
            if str(a.id) not in self.spatial:
                continue
            size = a.size
            if isinstance(size, int):
                mins.append(size), steps.append(0)
            elif isinstance(size, v0_5.ParameterizedSize):
                mins.append(size.min), steps.append(size.step)
            else:
                raise BioadaptError(f"{descr.name}'s input axis {a.id} takes its size from another tensor; "
                                    "bioadapt needs fixed or parameterized input sizes")
        for a in self.output.axes:
            size = getattr(a, "size", None)
            if str(a.id) in self.spatial and isinstance(size, v0_5.SizeReference) and size.offset:
                raise BioadaptError(f"{descr.name}'s output axis {a.id} differs from the input by {size.offset} "
                                    "pixels; bioadapt needs outputs of the input's size")
        return tuple(mins), tuple(steps)

    def to_model(self, x: Array) -> Array:
        """Canonical (N, C, *spatial) -> the model's input axis order."""
        return to_order(x, self.canonical, self.in_ids)

    def to_model_output(self, x: Array) -> Array:
        return to_order(x, self.canonical, self.out_ids)

    def from_model(self, x: Array, ids: Sequence[str]) -> Array:
        """A tensor in the model's axis order ``ids`` -> canonical (N, C, *spatial)."""
        return to_order(x, list(ids), self.canonical)


def to_order(x: Array, src: Sequence[str], dst: Sequence[str]) -> Array:
    """Reorder the axes of a numpy array or torch tensor from ``src`` to ``dst`` names; axes only in ``src``
    must have size 1 and are dropped, axes only in ``dst`` are added with size 1."""
    is_torch = isinstance(x, torch.Tensor)
    src = list(src)
    for i in reversed(range(len(src))):
        if src[i] not in dst:
            x = x.squeeze(i) if is_torch else np.squeeze(x, axis=i)
            del src[i]
    for d in dst:
        if d not in src:
            x = x.unsqueeze(-1) if is_torch else x[..., None]
            src.append(d)
    perm = [src.index(d) for d in dst]
    return x.permute(*perm) if is_torch else np.transpose(x, perm)


class BioimageioAdapter(Adapter):
    """A bioimage.io model with MC dropout, batched passes, segmentation and fine-tuning."""

    def __init__(self, descr: v0_5.ModelDescr, source: str, *, device: str | torch.device = "auto",
                 dropout_p: float = 0.05, mc_scope: str = "full", output_activation: str | None = None,
                 weights_format: str | None = None, dropout_kind: DropoutKind = "channel",
                 memory_budget: int | None = None):
        self.description = descr
        self.source = source
        self.device = resolve_device(device)
        self.layout = _Layout(descr)
        self.weights_format = self._pick_format(descr, weights_format)
        self.dropout_p = dropout_p
        self.dropout_kind = dropout_kind
        if mc_scope not in ("full", "head"):
            raise BioadaptError(f"mc_scope must be 'full' or 'head', got {mc_scope!r}")
        self.mc_scope = mc_scope
        self.memory_budget = memory_budget or default_memory_budget(self.device)
        if self.device.type == "cpu":
            tune_malloc()
        self._pre_ops, post_ops = setup_pre_and_postprocessing(descr, dataset_for_initial_statistics=[])
        self._mask_op = None
        self.module: nn.Module | None = None
        self._core_adapter = None
        if self.weights_format in TRAINABLE_FORMATS:
            self.module = self._load_module()
            self.mc = MCDropout(self.module, dropout_p, dropout_kind)
        self.output_kind, self._post_ops, self._from_logits, self._extra_activation = self._output_rule(
            post_ops, output_activation)
        self._head: HeadSplit | None = None
        self._bytes_per_sample: dict[tuple[int, ...], int] = {}

    # -- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, source: str | Path, **kwargs: Any) -> BioimageioAdapter:
        return cls(load_model_description(source), str(source), **kwargs)

    @staticmethod
    def _pick_format(descr: v0_5.ModelDescr, wanted: str | None) -> str:
        present = [f for f in TRAINABLE_FORMATS + INFERENCE_FORMATS if getattr(descr.weights, f, None) is not None]
        if wanted is not None:
            if wanted not in present:
                raise BioadaptError(f"{descr.name} has no {wanted} weights; it has {present}")
            return wanted
        if not present:
            raise BioadaptError(f"{descr.name} has no weights bioadapt can run")
        return present[0]

    def _load_module(self) -> nn.Module:
        weights = getattr(self.description.weights, self.weights_format)
        if self.weights_format == "pytorch_state_dict":
            from bioimageio.core.backends.pytorch_backend import load_torch_model

            module = load_torch_model(weights, load_state=True, devices=[self.device])
        else:
            module = torch.jit.load(io.BytesIO(weights.get_reader().read()), map_location=self.device)
        module.eval()
        for p in module.parameters():
            p.requires_grad_(True)
        return module.to(self.device)

    def _output_rule(self, post_ops: list, output_activation: str | None):
        """(output kind, post-processing ops to apply, network outputs logits?, activation bioadapt applies)."""
        name = self.description.name
        flow_ops = [i for i, op in enumerate(post_ops) if type(op).__name__ == "CellposeFlowDynamics"]
        if flow_ops:  # a Cellpose network: probabilities from its cell-probability channel, masks from the op
            # the declared output is the labels (one channel); the network itself gives flow_y, flow_x, cellprob
            self._mask_op = post_ops[flow_ops[0]]
            return "cellpose", post_ops[:flow_ops[0]], True, None
        activations = [i for i, op in enumerate(post_ops) if isinstance(op, (Sigmoid, Softmax))]
        if activations:
            last = activations[-1]
            kind = "sigmoid" if isinstance(post_ops[last], Sigmoid) else "softmax"
            if output_activation not in (None, kind):
                raise BioadaptError(f"{name} declares a {kind} output; output_activation={output_activation!r} "
                                    "contradicts it: leave it out")
            if last < len(post_ops) - 1:
                log.info("%s: post-processing after the %s is skipped: bioadapt needs the probabilities", name, kind)
            return kind, post_ops[:last + 1], True, None
        ending = self._final_module()
        if ending is not None:
            kind = "sigmoid" if isinstance(ending, nn.Sigmoid) else "softmax"
            return kind, post_ops, False, None
        if output_activation in ("sigmoid", "softmax"):
            return output_activation, post_ops, True, output_activation
        if output_activation is not None:
            raise BioadaptError(f"output_activation must be 'sigmoid' or 'softmax', got {output_activation!r}")
        raise BioadaptError(f"{name} does not say whether its outputs are sigmoid channels or softmax classes "
                            "(no sigmoid/softmax post-processing, no final activation layer). BALD needs "
                            "probabilities: pass output_activation='sigmoid' or 'softmax' to apply to its outputs")

    def _final_module(self) -> nn.Module | None:
        """The network's last module when it is a sigmoid or softmax (then it outputs probabilities itself)."""
        if self.module is None or isinstance(self.module, torch.jit.ScriptModule):
            return None
        leaves = [m for m in self.module.modules() if not list(m.children())]
        last = leaves[-1] if leaves else None
        return last if isinstance(last, (nn.Sigmoid, nn.Softmax)) else None

    # -- description -------------------------------------------------------------------------------------------
    def describe(self) -> ModelInfo:
        lay = self.layout
        scopes = ("full", "head") if self.module is not None and not isinstance(
            self.module, torch.jit.ScriptModule) else ("full",) if self.module is not None else ()
        return ModelInfo(
            kind="bioimageio", name=self.description.name, source=self.source, axes=lay.axes,
            input_channels=lay.input_channels, min_shape=lay.min_shape, step=lay.step, halo=lay.halo,
            output_kind=self.output_kind,
            n_classes=2 if self.output_kind == "cellpose" else lay.output_channels,
            class_names=("background", "cell") if self.output_kind == "cellpose" else lay.class_names,
            weights_format=self.weights_format, trainable=self.module is not None,
            mc_dropout=self.mc.strategy if self.module is not None else "none", mc_scopes=scopes,
            dropout_p=self.dropout_p)

    # -- the pipeline pieces -----------------------------------------------------------------------------------
    def _preprocess(self, x: np.ndarray) -> torch.Tensor:
        """Each image through the model's own pre-processing (per image, as bioimageio.core predicts)."""
        lay = self.layout
        out = []
        for image in x:
            sample = Sample(members={lay.input.id: Tensor(lay.to_model(image[None]), dims=lay.in_ids)}, stat={},
                            id=None)
            for op in self._pre_ops:
                op(sample)
            tensor = sample.members[lay.input.id]
            out.append(lay.from_model(tensor.to_numpy(), [str(d) for d in tensor.dims]))
        return torch.from_numpy(np.concatenate(out).astype(np.float32, copy=False)).to(self.device)

    def network_input(self, image: np.ndarray) -> torch.Tensor:
        """The tensor the network itself receives for one (C, *spatial) image: pre-processed, padded, in the
        model's axis order (what exporters trace and compare weight formats on)."""
        checked, _ = check_images(np.asarray(image)[None], self.describe())
        return self.layout.to_model(self._padded(self._preprocess(checked)))

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        target = valid_shape(x.shape[2:], self.layout.min_shape, self.layout.step, self.layout.halo)
        return pad_to(x, target, self.layout.halo)

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        """Raw outputs for padded, pre-processed (N, C, *spatial) inputs, canonical order."""
        if self.module is None:
            return self._core_forward(x)
        return self.layout.from_model(self.module(self.layout.to_model(x)), self.layout.out_ids)

    def _core_forward(self, x: torch.Tensor) -> torch.Tensor:
        from bioimageio.core.backends import create_model_adapter

        lay = self.layout
        if self._core_adapter is None:
            self._core_adapter = create_model_adapter(self.description, devices=[str(self.device)],
                                                      weight_format_priority_order=[self.weights_format])
            self._core_adapter.load()
        batch = Tensor(lay.to_model(x.cpu().numpy()), dims=lay.in_ids)
        out = self._core_adapter.forward({lay.input.id: batch})[lay.output.id]
        array = lay.from_model(out.to_numpy(), [str(d) for d in out.dims])
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    def _postprocess(self, raw: torch.Tensor) -> np.ndarray:
        """Raw (N, K, *spatial) outputs -> float32 probabilities through the model's own post-processing."""
        lay = self.layout
        array = raw.detach().float().cpu().numpy()
        if self._post_ops:
            per_image = any(op.required_measures for op in self._post_ops)
            chunks = [array[i:i + 1] for i in range(len(array))] if per_image else [array]
            done = []
            for chunk in chunks:
                sample = Sample(members={lay.output.id: Tensor(lay.to_model_output(chunk), dims=lay.out_ids)},
                                stat={}, id=None)
                with np.errstate(over="ignore"):  # a sigmoid's exp(-x) overflows to inf on large negative
                    for op in self._post_ops:     # logits and gives the right 0: an expected warning, not news
                        op(sample)
                tensor = sample.members[lay.output.id]
                done.append(lay.from_model(tensor.to_numpy(), [str(d) for d in tensor.dims]))
            array = np.concatenate(done)
        if self._extra_activation == "sigmoid":
            with np.errstate(over="ignore"):  # as above: exp(-x) -> inf gives 0
                array = 1 / (1 + np.exp(-array))
        elif self._extra_activation == "softmax":
            e = np.exp(array - array.max(1, keepdims=True))
            array = e / e.sum(1, keepdims=True)
        if self.output_kind == "cellpose":  # (1 - p, p) of the cell-probability logit, as Cellpose does
            p = 1 / (1 + np.exp(-array[:, 2:3]))
            array = np.concatenate([1 - p, p], axis=1)
        return np.ascontiguousarray(array, dtype=np.float32)

    # -- inference ---------------------------------------------------------------------------------------------
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x, single = check_images(x, self.describe())
        proba = self._postprocess(self._raw(x))
        return proba[0] if single else proba

    def _raw(self, x: np.ndarray) -> torch.Tensor:
        """Deterministic raw network outputs for checked images, cropped back to their shape."""
        pre = self._preprocess(x)
        with torch.no_grad():
            raw = torch.cat([self._network(self._padded(pre[i:i + 1])) for i in range(len(pre))]) \
                if self.module is None else self._network(self._padded(pre))
        return crop_from(raw, x.shape[2:], self.layout.halo)

    def _chunk(self, padded: torch.Tensor) -> int:
        """How many padded images one forward call may take within the memory budget."""
        key = tuple(padded.shape[1:])
        if key not in self._bytes_per_sample:
            self._bytes_per_sample[key] = activation_bytes(self.module, self.layout.to_model(padded[:1]))
        return max(1, self.memory_budget // self._bytes_per_sample[key])

    def mc_proba(self, x: np.ndarray, passes: int = 16, *, seed: int = 0, scope: str | None = None) -> np.ndarray:
        info = self.describe()
        if self.module is None:
            raise BioadaptError(f"{info.name}: MC dropout needs torch weights (pytorch_state_dict or torchscript); "
                                f"this model runs from {self.weights_format}, whose runtime keeps dropout off. "
                                "Use predict_proba/segment, or a package with torch weights")
        if passes < 1:
            raise BioadaptError(f"passes must be >= 1, got {passes}")
        scope = scope or self.mc_scope
        if scope not in info.mc_scopes:
            raise BioadaptError(f"mc scope {scope!r} is not available for {info.name}; available: {info.mc_scopes}")
        x, single = check_images(x, info)
        padded = self._padded(self._preprocess(x))
        n = len(padded)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)  # only TorchScript's own dropout layers draw from the global generator
            if scope == "head":
                raw = self._head_passes(padded, passes, seed)
            else:
                raw = stacked_passes(self.mc, self._network, padded, passes, self._chunk(padded), seed)
        raw = crop_from(raw, x.shape[2:], self.layout.halo)
        proba = self._postprocess(raw).reshape(passes, n, *raw.shape[1:])
        return proba[:, 0] if single else proba

    def _head_passes(self, padded: torch.Tensor, passes: int, seed: int) -> torch.Tensor:
        lay = self.layout
        if self._head is None:
            self._head = HeadSplit(self.module, lay.to_model(padded[:1]))
        features = self._head.features(self.module, lay.to_model(padded))
        raw = self._head.passes(features, CommonMasks(seed, self.dropout_p, self.dropout_kind), passes)
        return lay.from_model(raw, lay.out_ids)

    def segment(self, x: np.ndarray) -> np.ndarray:
        if self.output_kind == "cellpose":
            return self._cellpose_masks(x)
        proba = self.predict_proba(x)
        single = proba.ndim == len(self.layout.axes)
        batch = proba[None] if single else proba
        labels = np.stack([labels_from_probabilities(p, self.output_kind) for p in batch])
        return labels[0] if single else labels

    def _cellpose_masks(self, x: np.ndarray) -> np.ndarray:
        """The package's own cellpose_flow_dynamics op (bioimageio.core runs Cellpose) on the raw outputs."""
        checked, single = check_images(x, self.describe())
        lay = self.layout
        raw = self._raw(checked).detach().float().cpu().numpy()
        sample = Sample(members={lay.output.id: Tensor(lay.to_model_output(raw), dims=lay.out_ids)}, stat={}, id=None)
        for op in [*self._post_ops, self._mask_op]:
            op(sample)
        tensor = sample.members[lay.output.id]
        labels = lay.from_model(tensor.to_numpy(), [str(d) for d in tensor.dims])[:, 0].astype(np.int32)
        return labels[0] if single else labels

    # -- training ----------------------------------------------------------------------------------------------
    def fine_tune(self, samples: Sequence[tuple[np.ndarray, np.ndarray]],
                  params: FineTuneParams | Mapping[str, Any] | None = None,
                  progress: Progress | None = None, stop: Stop | None = None) -> FineTuneResult:
        info = self.describe()
        if self.module is None:
            raise BioadaptError(f"{info.name} runs from {self.weights_format} weights, which cannot be fine-tuned; "
                                f"fine-tuning needs one of {list(TRAINABLE_FORMATS)}")
        if self.output_kind == "cellpose":
            raise BioadaptError(f"{info.name} is a Cellpose network packaged for bioimage.io; fine-tune it with "
                                "Cellpose's training: load_adapter('cellpose:/path/to/weights') on its weights")
        params = FineTuneParams.from_any(params)
        pairs = check_samples(samples, info)
        shapes = {image.shape[1:] for image, _ in pairs}
        common = tuple(max(s[i] for s in shapes) for i in range(len(self.layout.spatial)))
        target_shape = valid_shape(common, self.layout.min_shape, self.layout.step, (0,) * len(common))
        inputs, targets, valid = [], [], []
        no_halo = (0,) * len(common)
        for image, labels in pairs:
            inputs.append(pad_to(self._preprocess(image[None]), target_shape, no_halo))
            # targets and the valid-pixel mask are padded with zeros after the patch, where the input was mirrored
            after = [v for s, n in reversed(list(zip(labels.shape, target_shape))) for v in (0, n - s)]
            t = torch.from_numpy(make_targets(labels, self.output_kind, info.n_classes))[None]
            targets.append(torch.nn.functional.pad(t, after))
            valid.append(torch.nn.functional.pad(torch.ones((1, 1, *labels.shape), dtype=torch.bool), after))
        inputs_t = torch.cat(inputs)
        targets_t = torch.cat(targets).to(self.device)
        valid_t = torch.cat(valid).to(self.device)
        kind, from_logits = self.output_kind, self._from_logits
        result = fit(self.module, self._network, inputs_t, targets_t, valid_t,
                     lambda out, t, v: loss(out, t, v, kind, from_logits),
                     lambda out, t, v: dice_score(out, t, v, kind, from_logits),
                     params, progress, stop)
        self.record_training(asdict(params), result.to_dict(), example_image=pairs[0][0])
        return result

    # -- weights -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.module is None:
            raise BioadaptError(f"{self.description.name} runs from {self.weights_format}: no torch state dict")
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.module is None:
            raise BioadaptError(f"{self.description.name} runs from {self.weights_format}: no torch state dict")
        try:
            self.module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise BioadaptError(f"these weights do not fit {self.description.name}: {e}") from e

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if self.module is None:
            raise BioadaptError(f"{self.description.name} runs from {self.weights_format}; only torch weights "
                                "can be saved after adaptation")
        if path.is_dir():
            path = path / ("weights.pt" if self.weights_format == "pytorch_state_dict" else "weights-torchscript.pt")
        if self.weights_format == "torchscript":
            torch.jit.save(self.module, str(path))
        else:
            torch.save(self.state_dict(), path)
        return path
