"""Smaller inputs for a fixed-shape model whose network does not need its fixed shape.

Many bioimage.io descriptions fix the input shape (``unet2d_nuclei_broad``: 1 x 1 x 512 x 512, halo 32) although
the network is fully convolutional. Scoring a 128-pixel patch or training on it then costs a 512-pixel pass, 16
times the work. This module asks the network itself: it runs it on seeded noise at the fixed shape and on windows
of that input cut to smaller sizes ``min + k * step``, and accepts a step only when every window's output, inside
the halo, equals the fixed-shape output at the same pixels (within ``TOLERANCE`` of the output's spread). A
network with a global layer, a traced fixed shape or a receptive field beyond its halo fails and keeps its
fixed shape. Prediction keeps the described shape in any case; scoring and training use the probed grid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from bioadapt.adapters.shapes import AxisSize, InputGrid

log = logging.getLogger(__name__)

STEPS = (2, 4, 8, 16, 32, 64)  # U-Nets need 2 ** depth
# largest |difference| inside the halo, as a fraction of the fixed-shape output's standard deviation. Measured on
# unet2d_nuclei_broad: at most 0.0017 on its test input and 0.0052 on noise for windows on its step-8 lattice,
# 0.024 for a window cut 4 pixels off that lattice.
TOLERANCE = 0.01


def convolutional_grid(network: Callable[[torch.Tensor], torch.Tensor], fixed: Sequence[int],
                       halo: Sequence[int], channels: int, seed: int = 0) -> InputGrid | None:
    """The grid of smaller inputs that give ``network`` ((1, C, *spatial) -> (1, K, *spatial), canonical axes)
    the same output as its fixed input ``fixed`` does, or None when no step does."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1, channels, *fixed), generator=generator)
    with torch.no_grad():
        try:
            reference = network(x)
        except Exception as e:  # noqa: BLE001 - whatever the network raises, it cannot be probed
            log.info("the network fails on noise of its fixed shape %s (%s); keeping it", tuple(fixed), e)
            return None
        limit = TOLERANCE * float(reference.std()) + 1e-6
        for step in STEPS:
            smallest = [_smallest(n, h, step) for n, h in zip(fixed, halo)]
            if any(s >= n for s, n in zip(smallest, fixed)):
                break
            sizes = ([n - step for n in fixed], smallest)
            if all(_agrees(network, x, reference, size, halo, step, limit) for size in sizes):
                return InputGrid([AxisSize(min=s, step=step) for s in smallest])
    return None


def _smallest(fixed: int, halo: int, step: int) -> int:
    """The smallest size on the fixed size's step lattice with at least one step of pixels inside its halo."""
    size = fixed % step or step
    while size < 2 * halo + step:
        size += step
    return size


def _agrees(network: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, reference: torch.Tensor,
            size: Sequence[int], halo: Sequence[int], step: int, limit: float) -> bool:
    # windows start on the step lattice, so pooling sees the same pixel groups as in the fixed input
    start = [((n - s) // 2 // step) * step for n, s in zip(x.shape[2:], size)]
    window = (slice(None), slice(None), *(slice(a, a + s) for a, s in zip(start, size)))
    try:
        out = network(x[window])
    except Exception:  # noqa: BLE001 - networks refuse sizes their own way (torch_em's U-Net: ValueError)
        return False
    if tuple(out.shape[2:]) != tuple(size):
        return False
    inside = (slice(None), slice(None), *(slice(h, s - h) for h, s in zip(halo, size)))
    there = (slice(None), slice(None), *(slice(a + h, a + s - h) for a, h, s in zip(start, halo, size)))
    return float((out[inside] - reference[there]).abs().max()) <= limit
