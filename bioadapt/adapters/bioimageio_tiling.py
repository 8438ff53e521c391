"""bioimageio.core's way through an image, with the network call left to the caller.

bioimageio.core predicts one sample at a time and calls the network once per block. bioadapt keeps core's
pieces (halo padding with the description's pad mode, its pre- and post-processing operators, its block
splitting and block-to-output transform) and only gathers the network inputs of many images, blocks and MC
passes into few forward calls. Per image shape, one of core's two ways:

- whole: the image plus its halo on both sides is a valid input shape, or becomes one after padding at its end
  (cropped off again). As ``predict_sample_without_blocking``: pad by the halo, pre-process, predict,
  post-process, crop the halo. The padding up to a valid shape comes after pre-processing, so per-sample
  statistics see only the image and its halo. Equals core's prediction of the image where core can make it.
- whole without the halo: a fixed input shape is one block with the halo inside it, so an image that fits it
  (but not with its halo) is one pass without halo padding. At the fixed shape exactly this is the route of the
  package's own model test (no padding, no cropping), whose test output it reproduces.
- blocks: a fixed input size smaller than the image, or an image beyond the memory budget. As
  ``predict_sample_with_fixed_blocking``: sample-wise pre-processing of the image, blocks of a valid shape with
  their halos inside, block-wise pre-processing, predict, stitch, post-process. An image smaller than one block
  on some axis is padded at its end first (core refuses those).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from bioimageio.core.axis import AxisId
from bioimageio.core.common import Halo
from bioimageio.core.digest_spec import get_block_transform, get_input_halo
from bioimageio.core.proc_ops import BlockwiseOperator
from bioimageio.core.sample import Sample
from bioimageio.core.tensor import Tensor
from bioimageio.spec.model import v0_5

from bioadapt.adapters.bioimageio_layout import Layout
from bioadapt.adapters.shapes import InputGrid
from bioadapt.errors import BioadaptError

# forward(network inputs (N, *model input axes), pass indices or None) -> outputs (len(passes) * N or N rows,
# *model output axes), pass-major: row t * N + n is pass passes[t] of input n
Forward = Callable[[np.ndarray, Sequence[int] | None], np.ndarray]


@dataclass(frozen=True)
class Plan:
    """How one image shape goes through the network: ``shape`` is the network input's spatial shape."""

    whole: bool
    shape: tuple[int, ...]
    extra: tuple[int, ...] = ()  # whole: padding after the image and its halo, up to a valid shape
    halo: bool = True  # whole: the image is padded by the halo (False: a fixed input holds the image, halo inside)


@dataclass
class Block:
    data: np.ndarray  # (1, *model input axes), pre-processed
    inner: tuple[slice, ...]  # where its output lands on the canvas (spatial, canonical order)
    local: tuple[slice, ...]  # which part of its output that is


@dataclass
class Prepared:
    """One image's network inputs, and where their outputs go: a canvas, post-processed, then cropped."""

    blocks: list[Block]
    canvas: tuple[int, ...]
    crop: tuple[slice, ...]
    stat: dict


class CoreTiling:
    """bioimageio.core's halo, pad mode, pre-processing split and block transform for one description."""

    def __init__(self, descr: v0_5.ModelDescr, layout: Layout, pre_ops: Sequence[Any],
                 grid: InputGrid | None = None):
        self.layout = layout
        self.grid = grid or layout.grid  # another grid: the network's own (``shape_probe``), not the described one
        self.in_id, self.out_id = layout.input.id, layout.output.id
        output_halo = {self.out_id: {a.id: Halo(a.halo, a.halo) for a in layout.output.axes
                                     if isinstance(a, v0_5.WithHalo)}}
        input_halo = get_input_halo(descr, output_halo).get(self.in_id, {})
        self.halo_by_axis = {a: input_halo.get(AxisId(a), Halo(0, 0)) for a in layout.spatial}
        self.halo = tuple(h.left for h in self.halo_by_axis.values())
        if any(h.left != h.right for h in self.halo_by_axis.values()):
            raise BioadaptError(f"{descr.name} has an asymmetric halo {self.halo_by_axis}; bioadapt needs equal "
                                "halos on both sides")
        self.block_transform = get_block_transform(descr)
        self.pad_mode = layout.input.pad or v0_5.SymmetricPadding()
        self.pre_ops = list(pre_ops)
        # as core's PredictionPipeline: sample-wise up to the last operator that needs the whole sample
        last_samplewise = max((i for i, op in enumerate(self.pre_ops) if not isinstance(op, BlockwiseOperator)),
                              default=-1)
        self.samplewise_pre = self.pre_ops[:last_samplewise + 1]
        self.blockwise_pre = self.pre_ops[last_samplewise + 1:]
        smallest = self.grid.smallest
        if any(s <= 2 * h for s, h in zip(smallest, self.halo)):
            raise BioadaptError(f"{descr.name}'s smallest input {smallest} is not larger than twice its halo "
                                f"{self.halo}: no block would have a valid centre")

    # -- planning ----------------------------------------------------------------------------------------------
    def plan(self, shape: Sequence[int], max_voxels: int | None = None) -> Plan:
        grid = self.grid
        with_halo = tuple(s + 2 * h for s, h in zip(shape, self.halo))
        fits = (lambda s: True) if max_voxels is None else (lambda s: math.prod(s) <= max_voxels)
        whole = grid.at_least(with_halo)  # the image with its halo itself, when that is valid
        if whole is not None and fits(whole):
            return Plan(True, whole, tuple(w - s for w, s in zip(whole, with_halo)))
        if whole is None:  # a fixed axis: the fixed input is a block with its halo inside it
            bare = grid.at_least(shape)
            if bare is not None and fits(bare):  # the image fits one block: one pass, as the package's own test
                return Plan(True, bare, tuple(b - s for b, s in zip(bare, shape)), halo=False)
        block = grid.at_most([max(s, m) for s, m in zip(shape, grid.smallest)])
        while not fits(block):
            target = list(block)
            target[int(np.argmax(block))] -= 1
            smaller = grid.at_most(target)
            if smaller == block or any(b <= 2 * h for b, h in zip(smaller, self.halo)):
                break
            block = smaller
        return Plan(False, block)

    # -- network inputs ------------------------------------------------------------------------------------------
    def sample(self, image: np.ndarray, index: int = 0) -> Sample:
        """One (C, *spatial) image as a core sample in the model's axes."""
        tensor = Tensor(self.layout.to_model(image[None]), dims=tuple(AxisId(a) for a in self.layout.in_ids))
        return Sample(members={self.in_id: tensor}, stat={}, id=index)

    def _pad(self, sample: Sample, widths: dict[str, tuple[int, int]]) -> Sample:
        if not any(sum(w) for w in widths.values()):
            return sample
        return sample.pad({self.in_id: {AxisId(a): w for a, w in widths.items()}}, self.pad_mode)

    def prepare(self, image: np.ndarray, plan: Plan, index: int = 0) -> Prepared:
        spatial = self.layout.spatial
        shape = image.shape[1:]
        sample = self.sample(image, index)
        if plan.whole:
            halo = self.halo if plan.halo else (0,) * len(spatial)
            sample = self._pad(sample, {a: (h, h) for a, h in zip(spatial, halo)})
            for op in self.pre_ops:  # on the image and its halo only, as core: padding never enters statistics
                op(sample)
            sample = self._pad(sample, {a: (0, e) for a, e in zip(spatial, plan.extra)})
            full = tuple(slice(0, n) for n in plan.shape)
            crop = tuple(slice(h, h + n) for h, n in zip(halo, shape))
            return Prepared([Block(self._array(sample.members[self.in_id]), full, full)], plan.shape, crop,
                            sample.stat)
        for op in self.samplewise_pre:
            op(sample)
        sample = self._pad(sample, {a: (0, max(0, b - n)) for a, b, n in zip(spatial, plan.shape, shape)})
        canvas = tuple(max(b, n) for b, n in zip(plan.shape, shape))
        _, parts = sample.split_into_blocks(
            {self.in_id: {AxisId(a): b for a, b in zip(spatial, plan.shape)}},
            halo={self.in_id: {AxisId(a): h for a, h in self.halo_by_axis.items()}}, pad_mode=self.pad_mode)
        blocks = []
        for part in parts:
            for op in self.blockwise_pre:
                op(part)
            out = part.get_transformed_meta(self.block_transform).blocks[self.out_id]
            blocks.append(Block(self._array(part.members[self.in_id]),
                                tuple(slice(out.inner_slice[AxisId(a)].start, out.inner_slice[AxisId(a)].stop)
                                      for a in spatial),
                                tuple(slice(out.local_slice[AxisId(a)].start, out.local_slice[AxisId(a)].stop)
                                      for a in spatial)))
        return Prepared(blocks, canvas, tuple(slice(0, n) for n in shape), sample.stat)

    def _array(self, tensor: Tensor) -> np.ndarray:
        return tensor.transpose([AxisId(a) for a in self.layout.in_ids]).data.to_numpy()

    # -- prediction ----------------------------------------------------------------------------------------------
    def predict(self, images: np.ndarray, forward: Forward, post_ops: Sequence[Any], *,
                passes: int | None = None, max_voxels: int | None = None,
                rows_per_call: Callable[[np.ndarray], int] = lambda block: 64) -> np.ndarray:
        """(B, C, *S) images -> (B, K, *S) outputs, or (T, B, K, *S) for ``passes`` = T MC passes.

        Blocks go to ``forward`` in groups whose passes make about ``rows_per_call(block)`` rows, so the outputs
        in flight stay within what one forward call may hold."""
        lay = self.layout
        plan = self.plan(images.shape[2:], max_voxels)
        prepared = [self.prepare(image, plan, index=i) for i, image in enumerate(images)]
        jobs = [(i, block) for i, p in enumerate(prepared) for block in p.blocks]
        n_passes = passes or 1
        pass_ids = list(range(passes)) if passes else None
        canvases: list[np.ndarray | None] = [None] * len(prepared)
        step = max(1, rows_per_call(jobs[0][1].data) // n_passes)
        for start in range(0, len(jobs), step):
            group = jobs[start:start + step]
            raw = forward(np.concatenate([block.data for _, block in group]), pass_ids)
            out = lay.from_model(raw, lay.out_ids)  # (T * G, K, *block spatial)
            out = out.reshape(n_passes, len(group), *out.shape[1:])
            for g, (i, block) in enumerate(group):
                if canvases[i] is None:
                    canvases[i] = np.zeros((n_passes, out.shape[2], *prepared[i].canvas), np.float32)
                canvases[i][(slice(None), slice(None), *block.inner)] = out[(slice(None), g, slice(None),
                                                                             *block.local)]
        results = []
        for p, canvas in zip(prepared, canvases):
            finished = self.postprocess(canvas, [p.stat] * n_passes, post_ops)
            results.append(finished[(slice(None), slice(None), *p.crop)])
        stacked = np.stack(results, axis=1)  # (T, B, K, *S)
        return stacked if passes else stacked[0]

    def postprocess(self, outputs: np.ndarray, stats: Sequence[dict], post_ops: Sequence[Any]) -> np.ndarray:
        """(M, K, *spatial) raw outputs -> the same through ``post_ops``, each row with its image's statistics
        (rows share one call when no operator needs statistics)."""
        if not post_ops:
            return np.ascontiguousarray(outputs, dtype=np.float32)
        lay = self.layout
        dims = tuple(AxisId(a) for a in lay.out_ids)
        per_row = any(op.required_measures for op in post_ops)
        chunks = [(outputs[i:i + 1], dict(stats[i])) for i in range(len(outputs))] if per_row else \
            [(outputs, {})]
        done = []
        for chunk, stat in chunks:
            sample = Sample(members={self.out_id: Tensor(lay.to_model_output(chunk), dims=dims)}, stat=stat, id=None)
            with np.errstate(over="ignore"):  # a sigmoid's exp(-x) overflows to inf on large negative logits
                for op in post_ops:           # and gives the right 0: an expected warning, not news
                    op(sample)
            tensor = sample.members[self.out_id]
            done.append(lay.from_model(tensor.data.to_numpy(), [str(d) for d in tensor.dims]))
        return np.ascontiguousarray(np.concatenate(done), dtype=np.float32)
