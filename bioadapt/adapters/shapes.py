"""Fitting any patch to a model's valid input shapes, and sizing forward batches to a memory budget."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def valid_shape(shape: Sequence[int], min_shape: Sequence[int], step: Sequence[int],
                halo: Sequence[int]) -> tuple[int, ...]:
    """Smallest ``min + k * step`` per axis that holds the patch plus its halo on both sides."""
    out = []
    for n, lo, st, h in zip(shape, min_shape, step, halo):
        need = n + 2 * h
        out.append(lo if need <= lo or st == 0 else lo + math.ceil((need - lo) / st) * st)
    return tuple(out)


def pad_to(x: torch.Tensor, target: Sequence[int], halo: Sequence[int]) -> torch.Tensor:
    """Pad (N, C, *spatial) to ``target``: ``halo`` before, the rest after; mirrored where the patch is big enough."""
    spatial = x.shape[2:]
    before_after = [(h, t - s - h) for s, t, h in zip(spatial, target, halo)]
    if all(b == 0 and a == 0 for b, a in before_after):
        return x
    flat = [v for b, a in reversed(before_after) for v in (b, a)]  # F.pad lists the last axis first
    mode = "reflect" if all(max(b, a) < s for (b, a), s in zip(before_after, spatial)) else "replicate"
    return F.pad(x, flat, mode=mode)


def crop_from(y: torch.Tensor, shape: Sequence[int], halo: Sequence[int]) -> torch.Tensor:
    """Undo ``pad_to`` on an output of the same spatial size as the padded input."""
    index = (slice(None), slice(None)) + tuple(slice(h, h + s) for s, h in zip(shape, halo))
    return y[index]


def activation_bytes(module: nn.Module, example: torch.Tensor) -> int:
    """Bytes of every leaf layer's output for one forward pass of ``example``: an upper bound of what a
    no-grad forward keeps alive (U-Nets hold their skip connections, so the bound is not loose by much)."""
    total = 0

    def count(m: nn.Module, inputs: tuple, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    if isinstance(module, torch.jit.ScriptModule):
        # no hooks on TorchScript: assume 64 feature maps of the input's size per sample
        return 64 * example[0].numel() * example.element_size() * 4
    leaves = [m for m in module.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in handles:
            h.remove()
    return max(total, example.numel() * example.element_size())


def _available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 << 30


def default_memory_budget(device: torch.device) -> int:
    """Bytes a batched forward may use: half the free GPU memory, or a quarter of free RAM capped at 1 GiB
    (on CPU, batches beyond a few samples do not run faster; they only raise the peak)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return int(min(_available_ram() // 4, 1 << 30))


def default_input_budget(device: torch.device) -> int:
    """Bytes the forward of one whole image may use before it goes in blocks: an eighth of the machine's RAM (at
    least 1 GiB), or a quarter of the GPU's memory. Blocks are a last resort: a description whose halo is smaller
    than its network's reach shows seams at block borders (a 3D U-Net with halo (2, 8, 8) in 48 x 96 x 96 blocks
    was 0.34 away from bioimageio.core's whole prediction of a 60 x 112 x 112 volume). Total, not free memory: the
    plan, and so the prediction, of an image must not change with what else the machine is doing."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1] // 4
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        total = 8 << 30
    return max(1 << 30, total // 8)


@dataclass(frozen=True)
class AxisSize:
    """The valid sizes of one spatial input axis: ``min + k * step`` (``step`` 0: fixed at ``min``), or, when
    ``reference`` is set, ``size of axis reference * ratio + offset`` (a size the description ties to another axis)."""

    min: int = 1
    step: int = 0
    reference: int | None = None
    ratio: float = 1.0
    offset: int = 0

    def values(self, low: int, high: int) -> range:
        """The valid sizes of an independent axis within [low, high] (fixed: just ``min`` if it lies there)."""
        if self.step == 0:
            return range(self.min, self.min + 1) if low <= self.min <= high else range(0)
        first = self.min if low <= self.min else self.min + math.ceil((low - self.min) / self.step) * self.step
        return range(first, high + 1, self.step)

    def follow(self, reference_size: int) -> int:
        return int(round(reference_size * self.ratio)) + self.offset


class InputGrid:
    """The valid spatial input shapes of a model, per axis (see ``AxisSize``)."""

    SEARCH = 4096  # valid sizes tried per axis when an axis follows another

    def __init__(self, sizes: Sequence[AxisSize]):
        self.sizes = tuple(sizes)
        for i, size in enumerate(self.sizes):
            if size.reference is not None and self.sizes[size.reference].reference is not None:
                raise ValueError(f"axis {i} follows an axis that follows another one")

    @property
    def smallest(self) -> tuple[int, ...]:
        return self._complete([s.min if s.reference is None else 0 for s in self.sizes])

    def is_valid(self, shape: Sequence[int]) -> bool:
        for n, size in zip(shape, self.sizes):
            if size.reference is not None:
                if n != size.follow(shape[size.reference]):
                    return False
            elif n < size.min or (n != size.min if size.step == 0 else (n - size.min) % size.step):
                return False
        return True

    def at_least(self, shape: Sequence[int]) -> tuple[int, ...] | None:
        """The smallest valid shape that is at least ``shape`` on every axis; None if a fixed axis is smaller."""
        return self._search(shape, upward=True)

    def at_most(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The largest valid shape that is at most ``shape`` on every axis (the smallest valid one where none is)."""
        return self._search(shape, upward=False) or self.smallest

    def _search(self, shape: Sequence[int], upward: bool) -> tuple[int, ...] | None:
        chosen: list[int | None] = [None] * len(self.sizes)
        for i, size in enumerate(self.sizes):
            if size.reference is not None:
                continue
            followers = [j for j, s in enumerate(self.sizes) if s.reference == i]
            low, high = (shape[i], 1 << 30) if upward else (size.min, shape[i])
            candidates = size.values(low, high)
            if not upward:
                candidates = reversed(candidates)
            for count, value in enumerate(candidates):
                if count >= self.SEARCH:
                    break
                ok = all((self.sizes[j].follow(value) >= shape[j]) if upward else
                         (0 < self.sizes[j].follow(value) <= shape[j]) for j in followers)
                if ok:
                    chosen[i] = value
                    break
            if chosen[i] is None:
                return None
        return self._complete(chosen)

    def _complete(self, chosen: Sequence[int | None]) -> tuple[int, ...]:
        return tuple(size.follow(chosen[size.reference]) if size.reference is not None else int(chosen[i])
                     for i, size in enumerate(self.sizes))
