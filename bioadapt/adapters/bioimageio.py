"""Any bioimage.io model (format 0.4 or 0.5) behind the adapter interface.

bioimageio.core loads the description and the weights, and its own pipeline pieces carry every image through the
model (halo padding, pre-processing, blocks, post-processing; see ``bioimageio_tiling``), so ``predict_proba``
is core's prediction. The network itself is the one core's model adapter holds: MC dropout hooks and fine-tuning
act on it, and many images, blocks and passes share forward calls. Torch weights (pytorch_state_dict,
torchscript) are trainable; onnx, tensorflow and keras weights run for inference only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bioimageio.core.axis import AxisId
from bioimageio.core.proc_ops import Sigmoid, Softmax
from bioimageio.core.proc_setup import setup_pre_and_postprocessing
from bioimageio.core.tensor import Tensor
from bioimageio.spec.model import v0_5
from torch import nn

from bioadapt.adapters.allocator import tune_malloc
from bioadapt.adapters.augmentation import Augmentations
from bioadapt.adapters.base import (DEFAULT_DROPOUT_P, DEFAULT_MC_PASSES, Adapter, FineTuneParams, FineTuneResult,
                                    ModelInfo, Progress, Stop, check_images, check_samples)
from bioadapt.adapters.bioimageio_layout import Layout
from bioadapt.adapters.bioimageio_tiling import CoreTiling, Forward, Plan, Prepared
from bioadapt.adapters.bioimageio_weights import (TRAINABLE_FORMATS, choose_format, held_network,
                                                  load_core_adapter, torchscript_as_state_dict)
from bioadapt.adapters.dropout import (MC_SCOPES, CommonMasks, DropoutKind, HeadSplit, MCDropout, check_scope,
                                       is_scripted, mc_strategy, round_masks, stacked_passes)
from bioadapt.adapters.partial import PartialSplit, partial_passes
from bioadapt.adapters.segmentation import instance_f1, labels_from_probabilities
from bioadapt.adapters.shape_probe import convolutional_grid
from bioadapt.adapters.shapes import activation_bytes, default_input_budget, default_memory_budget
from bioadapt.adapters.sources import load_model_description
from bioadapt.adapters.targets import INSTANCE_TARGETS, Targets, as_probabilities, choose_targets, dice_score, loss
from bioadapt.adapters.training import fit
from bioadapt.errors import BioadaptError

log = logging.getLogger(__name__)

__all__ = ["BioimageioAdapter", "resolve_device"]
# Element dropout: a patch's mean score then averages many independent dropout patterns, and rankings repeat
# across round seeds (Spearman 0.92 at T = 16 on the benchmark pool, 0.47 with channel dropout at the same
# p = 0.05: benchmarks/bench_ranking.py, results/ranking.md).
DEFAULT_DROPOUT_KIND: DropoutKind = "element"
# Partial MC over the last 3 dropout sites: the smallest depth whose pool rankings kept Spearman >= 0.9 with full MC
# (object_mean and mean BALD, T = 16) on both real pools for both the demo U-Net and the real unet2d_nuclei_broad,
# 2.1-2.5x faster than full MC there (benchmarks/bench_partial_mc.py, results/partial_mc_*.md). Where the partial
# scope cannot work (TorchScript, test-time augmentation) the default is "full".
DEFAULT_MC_SCOPE = "partial"
DEFAULT_MC_DEPTH = 3  # mc_scope="partial": dropout sites (activation calls) from the end that stay stochastic
SAMPLE_SOURCES = ("auto", "dropout", "tta")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BioadaptError(f"device {device} was asked for but torch sees no CUDA GPU; use device='cpu' or 'auto'")
    return device


class BioimageioAdapter(Adapter):
    """A bioimage.io model with MC dropout, batched passes, segmentation and fine-tuning."""

    def __init__(self, descr: v0_5.ModelDescr, source: str, *, device: str | torch.device = "auto",
                 dropout_p: float = DEFAULT_DROPOUT_P, mc_scope: str | None = None,
                 mc_depth: int = DEFAULT_MC_DEPTH, output_activation: str | None = None,
                 weights_format: str | None = None, dropout_kind: DropoutKind = DEFAULT_DROPOUT_KIND,
                 memory_budget: int | None = None, output_targets: str | None = None,
                 affinity_offsets: Sequence[Sequence[int]] | None = None, sample_source: str = "auto",
                 fixed_shape: str = "probe"):
        self.description = descr
        self.source = source
        self.device = resolve_device(device)
        check_scope(mc_scope or DEFAULT_MC_SCOPE, mc_depth)
        self.layout = Layout(descr)  # refusals that need no weights come first
        self.weights_format = choose_format(descr, weights_format)
        pre_ops, post_ops = setup_pre_and_postprocessing(descr, dataset_for_initial_statistics=[])
        self.tiling = CoreTiling(descr, self.layout, pre_ops)
        self.dropout_p = dropout_p
        self.dropout_kind = dropout_kind
        self.mc_depth = int(mc_depth)
        self.memory_budget = memory_budget or default_memory_budget(self.device)  # one batched forward call
        self.input_budget = memory_budget or default_input_budget(self.device)  # one image before it goes in blocks
        if self.device.type == "cpu":
            tune_malloc()
        with ExitStack() as stack:
            runs = descr
            if self.weights_format == "torchscript" and weights_format is None:
                converted = stack.enter_context(torchscript_as_state_dict(descr, str(self.device)))
                if converted is not None:  # the same network with hooks: MC dropout and training work
                    log.info("%s: running its TorchScript weights in its pytorch_state_dict architecture",
                             descr.name)
                    runs, self.weights_format = converted, "pytorch_state_dict"
            self._core = load_core_adapter(runs, self.weights_format, str(self.device))
        self.module: nn.Module | None = None
        self.mc: MCDropout | None = None  # None where dropout cannot reach the network
        if self.weights_format in TRAINABLE_FORMATS:
            self.module = held_network(self._core)
            self.module.eval()
            for p in self.module.parameters():
                p.requires_grad_(True)
            if mc_strategy(self.module) != "none":
                self.mc = MCDropout(self.module, dropout_p, dropout_kind)
        self.sample_source = self._sample_source(sample_source)
        if mc_scope is None:  # the default where the network allows it
            mc_scope = DEFAULT_MC_SCOPE if DEFAULT_MC_SCOPE in self._scopes() else "full"
        self.mc_scope = mc_scope
        self._mask_op = None
        self.output_kind, self._post_ops, self._from_logits, self._extra_activation = self._output_rule(
            post_ops, output_activation)
        self.targets: Targets = choose_targets(
            self.output_kind, self.layout.output_channels, len(self.layout.spatial), output_targets,
            affinity_offsets, descr.config.model_dump() if hasattr(descr.config, "model_dump") else descr.config,
            descr.name)
        self._head: HeadSplit | None = None
        self._head_masks: CommonMasks | None = None  # the head scope's round masks (the full scope's live in mc)
        self._partial: PartialSplit | None = None
        self._voxel_bytes: float | None = None
        self.work_tiling = self._work_tiling(descr, fixed_shape)

    def _work_tiling(self, descr: v0_5.ModelDescr, fixed_shape: str) -> CoreTiling:
        """The tiling that scoring and training use: the described one, or for a fixed-shape torch network that
        gives the same outputs on smaller inputs (``shape_probe``) the same tiling on those smaller inputs."""
        if fixed_shape not in ("probe", "keep"):
            raise BioadaptError(f"fixed_shape must be 'probe' or 'keep', got {fixed_shape!r}")
        sizes = self.layout.grid.sizes
        if fixed_shape == "keep" or self.module is None or any(s.step or s.reference is not None for s in sizes):
            return self.tiling
        grid = convolutional_grid(self._network, self.layout.grid.smallest, self.tiling.halo,
                                  self.layout.input_channels)
        if grid is None:
            log.info("%s: its network needs its fixed input shape %s", descr.name, self.layout.grid.smallest)
            return self.tiling
        log.info("%s: fixed input shape %s, but its network gives the same outputs from %s in steps of %s; "
                 "scoring and training use those", descr.name, self.layout.grid.smallest, grid.smallest,
                 grid.sizes[0].step)
        return CoreTiling(descr, self.layout, self.tiling.pre_ops, grid)

    # -- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, source: str | Path, **kwargs: Any) -> BioimageioAdapter:
        return cls(load_model_description(source), str(source), **kwargs)

    def _sample_source(self, requested: str) -> str:
        """Where MC passes differ: "dropout" in the network, or "tta" (test-time augmentation, ``augmentation``) for
        networks dropout cannot reach; "auto" takes dropout where it can."""
        if requested not in SAMPLE_SOURCES:
            raise BioadaptError(f"sample_source must be one of {SAMPLE_SOURCES}, got {requested!r}")
        if requested == "tta" or (requested == "auto" and self.mc is None):
            return "tta"
        if self.mc is None:
            why = (f"its {self.weights_format} weights run in a runtime bioadapt cannot change"
                   if self.module is None else "it is TorchScript without dropout layers, which accepts no hooks"
                   if is_scripted(self.module) else "it has neither dropout layers nor activation modules")
            raise BioadaptError(f"{self.description.name}: dropout cannot make the network stochastic ({why}); "
                                "pass sample_source='tta' to draw passes from test-time augmentation, or load a "
                                "package whose pytorch_state_dict weights and architecture are at hand")
        return "dropout"

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
        ending = self._final_activation()
        if ending is not None:
            if output_activation not in (None, ending):
                raise BioadaptError(f"{name}'s network ends in a {ending}; output_activation={output_activation!r} "
                                    "contradicts it: leave it out")
            return ending, post_ops, False, None
        if output_activation in ("sigmoid", "softmax"):
            return output_activation, post_ops, True, output_activation
        if output_activation is not None:
            raise BioadaptError(f"output_activation must be 'sigmoid' or 'softmax', got {output_activation!r}")
        raise BioadaptError(f"{name} does not say whether its outputs are sigmoid channels or softmax classes "
                            "(no sigmoid/softmax post-processing, no final activation layer). BALD needs "
                            "probabilities: pass output_activation='sigmoid' or 'softmax' to apply to its outputs")

    def _final_activation(self) -> str | None:
        """"sigmoid" or "softmax" when the network's last module is one (it then outputs probabilities)."""
        if self.module is None:
            return None
        leaves = [m for m in self.module.modules() if not list(m.children())]
        name = getattr(leaves[-1], "original_name", type(leaves[-1]).__name__) if leaves else ""
        return {"Sigmoid": "sigmoid", "Softmax": "softmax"}.get(name)

    # -- description -------------------------------------------------------------------------------------------
    def _hookable(self) -> bool:
        return self.module is not None and not is_scripted(self.module)

    def _scopes(self) -> tuple[str, ...]:
        return MC_SCOPES if self._hookable() and self.sample_source == "dropout" else ("full",)

    def describe(self) -> ModelInfo:
        lay = self.layout
        hookable, scopes = self._hookable(), self._scopes()
        return ModelInfo(
            kind="bioimageio", name=self.description.name, source=self.source, axes=lay.axes,
            input_channels=lay.input_channels, min_shape=lay.min_shape, step=lay.step, halo=self.tiling.halo,
            output_kind=self.output_kind,
            n_classes=2 if self.output_kind == "cellpose" else lay.output_channels,
            class_names=("background", "cell") if self.output_kind == "cellpose" else lay.class_names,
            weights_format=self.weights_format, trainable=self.module is not None,
            mc_dropout=self.mc.strategy if self.mc is not None else "none", mc_scopes=scopes,
            dropout_p=self.dropout_p, patch_features=hookable, sample_source=self.sample_source,
            segments_passes=self.output_kind != "cellpose",
            instances=self.output_kind == "cellpose" or self.targets.kind in INSTANCE_TARGETS)

    def tiling_plan(self, shape: Sequence[int]) -> Plan:
        """How images of this spatial shape go through the network: whole (``Plan.whole``; padded after the
        image by ``Plan.extra``) as bioimageio.core's ``predict`` does, or in blocks of ``Plan.shape`` as its
        ``predict(..., input_block_shape=...)`` does."""
        return self.tiling.plan(tuple(shape), self._max_voxels())

    # -- the network ---------------------------------------------------------------------------------------------
    def _core_forward(self, batch: np.ndarray) -> np.ndarray:
        """Raw outputs of bioimageio.core's model adapter for network inputs in the model's axis order."""
        lay = self.layout
        tensor = Tensor(batch, dims=tuple(AxisId(a) for a in lay.in_ids))
        out = self._core.forward({lay.input.id: tensor})[lay.output.id]
        return out.transpose([AxisId(a) for a in lay.out_ids]).data.to_numpy()

    def _bytes_per_voxel(self) -> float:
        """Activation bytes of one forward per input voxel, measured once on the smallest valid input (U-Nets
        keep about the same per voxel at any size)."""
        if self._voxel_bytes is None:
            smallest = self.layout.grid.smallest
            example = self.layout.to_model(torch.zeros((1, self.layout.input_channels, *smallest)))
            self._voxel_bytes = activation_bytes(self.module, example.to(self.device)) / float(np.prod(smallest))
        return self._voxel_bytes

    def _rows_per_call(self, block: np.ndarray) -> int:
        """How many network inputs like ``block`` (1, ...) one forward call may take within the memory budget;
        1 for inference-only formats (their runtimes may fix the batch size)."""
        if self.module is None:
            return 1
        voxels = np.prod([n for n, a in zip(block.shape, self.layout.in_ids) if a in self.layout.spatial])
        return max(1, int(self.memory_budget // (self._bytes_per_voxel() * voxels)))

    def _max_voxels(self) -> int | None:
        """The largest network input (in voxels) whose forward fits the memory budget."""
        if self.module is None:
            return None
        return max(int(np.prod(self.layout.grid.smallest)), int(self.input_budget // self._bytes_per_voxel()))

    def _deterministic(self, batch: np.ndarray, passes: Sequence[int] | None) -> np.ndarray:
        rows = self._rows_per_call(batch[:1])
        with torch.no_grad():
            return np.concatenate([self._core_forward(batch[i:i + rows]) for i in range(0, len(batch), rows)])

    def _stochastic(self, seed: int, scope: str) -> Forward:
        """The forward of MC passes: every row of pass t gets pass t's masks, whatever else shares its call."""
        def full(batch: np.ndarray, passes: Sequence[int] | None) -> np.ndarray:
            def network(x: torch.Tensor) -> torch.Tensor:
                return torch.from_numpy(self._core_forward(x.numpy()))

            rows = self._rows_per_call(batch[:1])
            return stacked_passes(self.mc, network, torch.from_numpy(batch), len(passes), rows, seed).numpy()

        def head(batch: np.ndarray, passes: Sequence[int] | None) -> np.ndarray:
            features = self._head_features(batch)
            self._head_masks = round_masks(self._head_masks, seed, self.dropout_p, self.dropout_kind)
            raw = self._head.passes(features, self._head_masks, len(passes))
            return raw.cpu().numpy()

        def partial(batch: np.ndarray, passes: Sequence[int] | None) -> np.ndarray:
            x = torch.from_numpy(batch).to(self.device)
            if self._partial is None:
                self._partial = PartialSplit(self.mc, self._module_output, x[:1], self.mc_depth)
            rows = self._rows_per_call(batch[:1])
            return partial_passes(self._partial, self.mc, x, len(passes), rows, seed).cpu().numpy()

        return {"head": head, "partial": partial}.get(scope, full)

    def _module_output(self, x: torch.Tensor) -> torch.Tensor:
        """The network's raw output for network inputs ``x`` (the model's axis order), called directly."""
        return _first_output(self.module(x))

    def _head_features(self, batch: np.ndarray) -> torch.Tensor:
        """What the output layer reads for network inputs ``batch``, in calls sized by the memory budget."""
        x = torch.from_numpy(batch).to(self.device)
        if self._head is None:
            self._head = HeadSplit(self.module, x[:1], select=_first_output)
        rows = self._rows_per_call(batch[:1])
        return torch.cat([self._head.features(self.module, x[i:i + rows]) for i in range(0, len(x), rows)])

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        """The module with gradients, for training: canonical (N, C, *spatial) in, canonical out."""
        lay = self.layout
        return lay.from_model(_first_output(self.module(lay.to_model(x))), lay.out_ids)

    # -- inference ---------------------------------------------------------------------------------------------
    def _probabilities(self, outputs: np.ndarray) -> np.ndarray:
        """Post-processed outputs (..., K, *spatial) -> probabilities."""
        channel = -len(self.layout.spatial) - 1
        if self._extra_activation == "sigmoid":
            with np.errstate(over="ignore"):  # exp(-x) overflows to inf on large negative logits: the right 0
                outputs = 1 / (1 + np.exp(-outputs))
        elif self._extra_activation == "softmax":
            e = np.exp(outputs - outputs.max(channel, keepdims=True))
            outputs = e / e.sum(channel, keepdims=True)
        if self.output_kind == "cellpose":  # (1 - p, p) of the cell-probability logit, as Cellpose does
            with np.errstate(over="ignore"):
                p = 1 / (1 + np.exp(-np.take(outputs, [2], axis=channel)))
            outputs = np.concatenate([1 - p, p], axis=channel)
        return np.ascontiguousarray(outputs, dtype=np.float32)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x, single = check_images(x, self.describe())
        proba = self._probabilities(self.tiling.predict(x, self._deterministic, self._post_ops,
                                                        max_voxels=self._max_voxels(),
                                                        rows_per_call=self._rows_per_call))
        return proba[0] if single else proba

    def mc_proba(self, x: np.ndarray, passes: int = DEFAULT_MC_PASSES, *, seed: int = 0,
                 scope: str | None = None) -> np.ndarray:
        info = self.describe()
        if passes < 1:
            raise BioadaptError(f"passes must be >= 1, got {passes}")
        scope = scope or self.mc_scope
        if scope not in info.mc_scopes:
            raise BioadaptError(f"mc scope {scope!r} is not available for {info.name}; available: {info.mc_scopes}")
        x, single = check_images(x, info)
        if self.sample_source == "tta":
            samples = self._augmented_passes(x, passes, seed)
            proba = self._probabilities(samples)
            return proba[:, 0] if single else proba
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)  # only TorchScript's own dropout layers draw from the global generator
            samples = self.work_tiling.predict(x, self._stochastic(seed, scope), self._post_ops, passes=passes,
                                          max_voxels=self._max_voxels(), rows_per_call=self._rows_per_call)
        proba = self._probabilities(samples)
        return proba[:, 0] if single else proba

    def _augmented_passes(self, x: np.ndarray, passes: int, seed: int) -> np.ndarray:
        """(T, B, K, *spatial) post-processed outputs, pass t on the images under the round's t-th transform."""
        augment = Augmentations(seed)
        outputs = []
        for t in range(passes):
            raw = self.work_tiling.predict(augment.apply(t, x), self._deterministic, self._post_ops,
                                      max_voxels=self._max_voxels(), rows_per_call=self._rows_per_call)
            outputs.append(augment.undo(t, raw))
        return np.stack(outputs)

    def patch_features(self, x: np.ndarray) -> np.ndarray:
        """Mean and standard deviation over each image of the feature maps the output layer reads (the decoder's
        last features for a U-Net), computed through the same blocks as predictions: (B, 2F) float32."""
        info = self.describe()
        if not info.patch_features:
            raise BioadaptError(f"{info.name}: features need a torch module that accepts hooks "
                                "(pytorch_state_dict weights)")
        x, _ = check_images(x, info)

        def features(batch: np.ndarray, passes: Sequence[int] | None) -> np.ndarray:
            return self._head_features(batch).float().cpu().numpy()

        with torch.no_grad():
            maps = self.work_tiling.predict(x, features, [], max_voxels=self._max_voxels(),
                                       rows_per_call=self._rows_per_call)
        flat = maps.reshape(maps.shape[0], maps.shape[1], -1)
        return np.concatenate([flat.mean(2), flat.std(2)], 1).astype(np.float32)

    def segment(self, x: np.ndarray) -> np.ndarray:
        if self.output_kind == "cellpose":
            return self._cellpose_masks(x)
        proba = self.predict_proba(x)
        single = proba.ndim == len(self.layout.axes)
        batch = proba[None] if single else proba
        labels = np.stack([labels_from_probabilities(p, self.output_kind, self.targets) for p in batch])
        return labels[0] if single else labels

    def segment_samples(self, samples: np.ndarray) -> np.ndarray:
        if self.output_kind == "cellpose":
            return super().segment_samples(samples)
        samples = np.asarray(samples)
        flat = samples.reshape(-1, *samples.shape[-len(self.layout.axes):])
        labels = [labels_from_probabilities(p, self.output_kind, self.targets) for p in flat]
        return np.stack(labels).reshape(*samples.shape[:-len(self.layout.axes)], *flat.shape[2:])

    def _cellpose_masks(self, x: np.ndarray) -> np.ndarray:
        """The package's own cellpose_flow_dynamics op (bioimageio.core runs Cellpose) on the raw outputs."""
        checked, single = check_images(x, self.describe())
        labels = self.tiling.predict(checked, self._deterministic, [*self._post_ops, self._mask_op],
                                     max_voxels=self._max_voxels(), rows_per_call=self._rows_per_call)
        labels = labels[:, 0].astype(np.int32)
        return labels[0] if single else labels

    def network_input(self, image: np.ndarray) -> torch.Tensor:
        """The tensor the network itself receives for one (C, *spatial) image (its first block when the image is
        split): pre-processed and padded as bioimageio.core does, in the model's axis order (what exporters trace
        and compare weight formats on)."""
        checked, _ = check_images(np.asarray(image)[None], self.describe())
        prepared = self.tiling.prepare(checked[0], self.tiling_plan(checked.shape[2:]))
        return torch.from_numpy(np.ascontiguousarray(prepared.blocks[0].data)).to(self.device)

    # -- training ----------------------------------------------------------------------------------------------
    def fine_tune(self, samples: Sequence[tuple[np.ndarray, np.ndarray]],
                  params: FineTuneParams | Mapping[str, Any] | None = None,
                  progress: Progress | None = None, stop: Stop | None = None,
                  validate_on: Sequence[int] | None = None) -> FineTuneResult:
        info = self.describe()
        if self.module is None:
            raise BioadaptError(f"{info.name} runs from {self.weights_format} weights, which cannot be fine-tuned; "
                                f"fine-tuning needs one of {list(TRAINABLE_FORMATS)}")
        if self.output_kind == "cellpose":
            raise BioadaptError(f"{info.name} is a Cellpose network packaged for bioimage.io; fine-tune it with "
                                "Cellpose's training: load_adapter('cellpose:/path/to/weights') on its weights")
        params = FineTuneParams.from_any(params)
        pairs = check_samples(samples, info)
        common = tuple(max(image.shape[1 + i] for image, _ in pairs) for i in range(len(self.layout.spatial)))
        plan = self.work_tiling.plan(common, self._max_voxels())
        metric = params.val_metric or ("f1" if info.instances else "dice")
        if metric == "f1" and not info.instances:
            raise BioadaptError(f"{info.name} segments classes, not objects: validate its fine-tuning by "
                                "val_metric='dice'")
        inputs, targets, valid, instances, groups = [], [], [], [], []
        for patch, (image, labels) in enumerate(pairs):
            for block_input, target, mask, block_labels in self._training_blocks(image, labels, common, plan):
                inputs.append(block_input), targets.append(target), valid.append(mask), groups.append(patch)
                instances.append(block_labels)
        inputs_t = torch.from_numpy(np.stack(inputs)).to(self.device)
        targets_t = torch.from_numpy(np.stack(targets)).to(self.device)
        valid_t = torch.from_numpy(np.stack(valid)).to(self.device)
        kind, from_logits, rule = self.output_kind, self._from_logits, self.targets

        def score(out: torch.Tensor, rows: list[int]) -> float:
            if metric == "dice":
                return dice_score(out, targets_t[rows], valid_t[rows], kind, from_logits)
            proba = as_probabilities(out, kind, from_logits).float().cpu().numpy()
            return instance_f1(proba, np.stack([instances[i] for i in rows]),
                               valid_t[rows].all(1).cpu().numpy(), kind, rule)

        result = fit(self.module, self._network, inputs_t, targets_t, valid_t,
                     lambda out, t, v: loss(out, t, v, kind, from_logits), score,
                     params, progress, stop, groups=groups, validate_on=validate_on)
        result.val_metric = metric
        self.record_training(asdict(params), result.to_dict(), example_image=pairs[0][0])
        return result

    def _training_blocks(self, image: np.ndarray, labels: np.ndarray, common: tuple[int, ...], plan: Plan
                         ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """(network input (C, *block), target (K or 1, *block), valid (K or 1, *block), labels (*block), 0 outside
        the patch) per block of one patch, pre-processed and padded as prediction does; a patch smaller than
        ``common`` is mirrored up to it first and its extension left out of the loss."""
        lay = self.layout
        shape = labels.shape
        if shape != common:
            image = np.pad(image, [(0, 0)] + [(0, c - s) for s, c in zip(shape, common)], mode="symmetric")
        prepared: Prepared = self.work_tiling.prepare(image, plan)
        target, target_valid = self.targets.make(labels)
        out = []
        for block in prepared.blocks:
            block_input = lay.from_model(block.data, lay.in_ids)[0]
            block_target = np.zeros((len(target), *block_input.shape[1:]), target.dtype)
            block_valid = np.zeros((len(target_valid), *block_input.shape[1:]), bool)
            block_labels = np.zeros(block_input.shape[1:], np.int32)
            source, destination = [], []
            for inner, local, crop, n in zip(block.inner, block.local, prepared.crop, shape):
                start, stop = max(inner.start, crop.start), min(inner.stop, crop.start + n)
                if start >= stop:
                    break
                source.append(slice(start - crop.start, stop - crop.start))
                destination.append(slice(local.start + start - inner.start, local.start + stop - inner.start))
            else:
                block_target[(slice(None), *destination)] = target[(slice(None), *source)]
                block_valid[(slice(None), *destination)] = target_valid[(slice(None), *source)]
                block_labels[tuple(destination)] = labels[tuple(source)]
                out.append((np.ascontiguousarray(block_input, np.float32), block_target, block_valid,
                            block_labels))
        return out

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


def _first_output(output: Any) -> torch.Tensor:
    """The network's first output (bioimageio.core maps a tuple of outputs onto the described outputs)."""
    return output[0] if isinstance(output, (tuple, list)) else output
