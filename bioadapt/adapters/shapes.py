"""Fitting any patch to a model's valid input shapes, and sizing forward batches to a memory budget."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

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


def default_memory_budget(device: torch.device) -> int:
    """Bytes a batched forward may use: half the free GPU memory, or a quarter of free RAM capped at 1 GiB
    (on CPU, batches beyond a few samples do not run faster; they only raise the peak)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        available = 4 << 30
    return int(min(available // 4, 1 << 30))
