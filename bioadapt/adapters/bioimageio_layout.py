"""Where a bioimage.io model's axes sit, which input shapes it takes, and whether bioadapt can use its outputs.

bioadapt scores, segments and trains on the input's pixel grid: an output must have the input's spatial axes at
the input's size (a size reference with the same scale and no offset, or the same fixed size). Anything else is
refused here, at load, with one sentence that names the axis and why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from bioimageio.spec.model import v0_5

from bioadapt.adapters.shapes import AxisSize, InputGrid
from bioadapt.errors import BioadaptError

log = logging.getLogger(__name__)

SPATIAL = ("z", "y", "x")
Array = TypeVar("Array", np.ndarray, torch.Tensor)


class Layout:
    """The first input and first output of a description, and how our (B, C, [Z], Y, X) arrays map onto them."""

    def __init__(self, descr: v0_5.ModelDescr):
        name = descr.name
        if len(descr.inputs) != 1:
            raise BioadaptError(f"{name} has {len(descr.inputs)} inputs; bioadapt adapts single-input models")
        self.input = descr.inputs[0]
        self.output = descr.outputs[0]
        if len(descr.outputs) > 1:
            log.info("%s has %d outputs; bioadapt uses the first, %r", name, len(descr.outputs), self.output.id)
        self.in_ids = [str(a.id) for a in self.input.axes]
        self.out_ids = [str(a.id) for a in self.output.axes]
        for ids, what in ((self.in_ids, "input"), (self.out_ids, "output")):
            odd = [i for i in ids if i not in ("batch", "channel") + SPATIAL]
            if odd:
                raise BioadaptError(f"{name}'s {what} has axes {odd}: bioadapt handles batch, channel, z, y, x")
        self.spatial = tuple(a for a in SPATIAL if a in self.in_ids)
        if not self.spatial:
            raise BioadaptError(f"{name}'s input has no spatial axes; bioadapt segments images")
        missing = [a for a in self.spatial if a not in self.out_ids]
        if missing:
            raise BioadaptError(f"{name} maps the input's spatial axes {list(missing)} away (its output has axes "
                                f"{self.out_ids}): it is a classifier or regressor, and bioadapt needs a "
                                "segmentation output on the input's grid")
        if "batch" not in self.in_ids or "batch" not in self.out_ids:
            raise BioadaptError(f"{name} has no batch axis; bioadapt batches patches and needs one")
        self.canonical = ["batch", "channel", *self.spatial]
        self.input_channels = _channels(self.input)
        self.output_channels = _channels(self.output)
        self.class_names = tuple(_channel_names(self.output))
        self.grid = InputGrid([self._input_size(descr, a) for a in self.spatial])
        self._check_output_grid(descr)
        self.halo = tuple(int(getattr(self._output_axis(a), "halo", 0) or 0) for a in self.spatial)
        self.axes = "c" + "".join(self.spatial)

    @property
    def min_shape(self) -> tuple[int, ...]:
        return self.grid.smallest

    @property
    def step(self) -> tuple[int, ...]:
        return tuple(s.step if s.reference is None else self.grid.sizes[s.reference].step for s in self.grid.sizes)

    def _input_axis(self, axis_id: str) -> Any:
        return next(a for a in self.input.axes if str(a.id) == axis_id)

    def _output_axis(self, axis_id: str) -> Any:
        return next(a for a in self.output.axes if str(a.id) == axis_id)

    def _input_size(self, descr: v0_5.ModelDescr, axis_id: str) -> AxisSize:
        axis = self._input_axis(axis_id)
        size = axis.size
        if isinstance(size, int):
            return AxisSize(min=size, step=0)
        if isinstance(size, v0_5.ParameterizedSize):
            return AxisSize(min=size.min, step=size.step)
        if isinstance(size, v0_5.SizeReference):
            target = str(size.axis_id)
            if size.tensor_id != self.input.id or target not in self.spatial or target == axis_id:
                raise BioadaptError(f"{descr.name}'s input axis {axis_id} takes its size from {size.tensor_id}."
                                    f"{target}; bioadapt follows sizes tied to another spatial axis of the same "
                                    "input only")
            ratio = float(self._input_axis(target).scale) / float(axis.scale)
            return AxisSize(reference=self.spatial.index(target), ratio=ratio, offset=int(size.offset))
        raise BioadaptError(f"{descr.name}'s input axis {axis_id} has a size bioadapt does not know ({size!r})")

    def _check_output_grid(self, descr: v0_5.ModelDescr) -> None:
        for axis_id in self.spatial:
            axis = self._output_axis(axis_id)
            size = axis.size
            where = f"{descr.name}'s output axis {axis_id}"
            if isinstance(size, int):
                fixed_input = self._input_axis(axis_id).size
                if size != fixed_input:
                    raise BioadaptError(f"{where} has a fixed size {size} unrelated to the input's {axis_id}; "
                                        "bioadapt needs outputs on the input's pixel grid")
                continue
            if not isinstance(size, v0_5.SizeReference):
                raise BioadaptError(f"{where} has a data-dependent size; bioadapt needs outputs on the input's "
                                    "pixel grid")
            target = str(size.axis_id)
            if size.tensor_id != self.input.id or (target != axis_id and not self._same_size(axis_id, target)):
                raise BioadaptError(f"{where} takes its size from {size.tensor_id}.{size.axis_id}; bioadapt "
                                    f"needs it to follow the input's {axis_id}")
            ratio = float(self._input_axis(target).scale) / float(axis.scale)
            if abs(ratio - 1) > 1e-9:
                raise BioadaptError(f"{where} is {ratio:g} times the input's size: bioadapt scores, segments and "
                                    "trains on the input's pixel grid and cannot map a rescaled output back to it")
            if size.offset:
                raise BioadaptError(f"{where} is {-size.offset} pixels smaller than the input (offset "
                                    f"{size.offset}): bioadapt needs outputs of the input's size; describe the "
                                    "border as a halo instead")
        for a in self.output.axes:
            if str(a.id) in SPATIAL and str(a.id) not in self.spatial and a.size != 1:
                raise BioadaptError(f"{descr.name}'s output has a spatial axis {a.id} the input lacks (size "
                                    f"{a.size}); bioadapt needs outputs on the input's pixel grid")

    def _same_size(self, axis_id: str, other: str) -> bool:
        """Whether the input's ``axis_id`` always has the size of its ``other`` axis (a plain size reference)."""
        if other not in self.spatial:
            return False
        size = self.grid.sizes[self.spatial.index(axis_id)]
        return size.reference == self.spatial.index(other) and abs(size.ratio - 1) < 1e-9 and size.offset == 0

    def to_model(self, x: Array) -> Array:
        """Canonical (N, C, *spatial) -> the model's input axis order."""
        return to_order(x, self.canonical, self.in_ids)

    def to_model_output(self, x: Array) -> Array:
        return to_order(x, self.canonical, self.out_ids)

    def from_model(self, x: Array, ids: Sequence[str]) -> Array:
        """A tensor in the model's axis order ``ids`` -> canonical (N, C, *spatial)."""
        return to_order(x, list(ids), self.canonical)


def _channels(tensor: Any) -> int:
    for a in tensor.axes:
        if str(a.id) == "channel":
            return len(a.channel_names)
    return 1


def _channel_names(tensor: Any) -> list[str]:
    for a in tensor.axes:
        if str(a.id) == "channel":
            return [str(n) for n in a.channel_names]
    return [str(tensor.id)]


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
