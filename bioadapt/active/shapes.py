"""Shape outliers: the model's objects that look like touching nuclei merged into one.

MC dropout cannot see a merge the model makes with confidence: the passes agree, BALD is low on the merged blob
and its object score is too. Its shape shows it: two round nuclei joined are not convex. The ``nonconvex`` score
counts the model's objects of nucleus size whose solidity (area over convex-hull area) is below ``SOLIDITY``.

Nucleus size is the pool's, not the patch's: at least half the typical object area of every patch scored (the
median over their foreground pixels of their object's area). A patch's own typical area will not do: where the
model breaks texture into hundreds of irregular specks, the specks set it, and the patch ranks first for objects
that are no nuclei (measured: benchmarks/pick_errors.py). So a scoring worker records each patch's
``nonconvex_profile`` (its typical area, its foreground pixels, and its count of non-convex objects above each area
of ``AREA_GATES``), and the selection turns the pool's profiles into scores (``pool_nonconvex``), the gate rounded
down to a power of two.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bioadapt.active.objects import as_numpy

SOLIDITY = 0.9
AREA_GATES = tuple(2 ** i for i in range(4, 17))  # 16 to 65,536 pixels (voxels)
TYPICAL_AREA = "nonconvex:area"  # profile keys, stored beside the patch's other scores
FOREGROUND = "nonconvex:foreground"


def gate_key(gate: int) -> str:
    return f"nonconvex:{gate}"


def typical_area(labels: np.ndarray) -> float:
    """The median over the foreground pixels of their object's area (0 without objects)."""
    areas = np.bincount(np.asarray(labels).ravel())[1:]
    return _weighted_median(areas[areas > 0], areas[areas > 0])


def nonconvex_profile(labels: Any, mask: Any = None, solidity: float = SOLIDITY) -> dict[str, float]:
    """A patch's profile: its typical object area, its foreground pixels, and per gate of ``AREA_GATES`` how many
    of its objects at least that large are less solid than ``solidity``; with ``mask`` only objects with a pixel
    inside it count."""
    from skimage.measure import regionprops

    labels = as_numpy(labels).astype(np.int64)
    inside = None if mask is None else set(np.unique(labels[as_numpy(mask).astype(bool)]).tolist())
    areas = [region.area for region in regionprops(labels)
             if region.solidity < solidity and (inside is None or region.label in inside)]
    return {TYPICAL_AREA: typical_area(labels), FOREGROUND: float((labels > 0).sum()),
            **{gate_key(gate): float(sum(area >= gate for area in areas)) for gate in AREA_GATES}}


def pool_gate(profiles: Sequence[Mapping[str, float]]) -> int:
    """The area gate of a pool: half its typical object area (each patch's typical area weighted by its
    foreground pixels), rounded down to a gate of ``AREA_GATES``."""
    areas = np.array([p.get(TYPICAL_AREA, 0.0) for p in profiles], float)
    weights = np.array([p.get(FOREGROUND, 0.0) for p in profiles], float)
    half = _weighted_median(areas[weights > 0], weights[weights > 0]) / 2
    return max((gate for gate in AREA_GATES if gate <= half), default=AREA_GATES[0])


def pool_nonconvex(profiles: Sequence[Mapping[str, float]]) -> list[float]:
    """Each patch's score: its non-convex objects of the pool's nucleus size (``pool_gate``)."""
    key = gate_key(pool_gate(profiles))
    return [float(p.get(key, 0.0)) for p in profiles]


def nonconvex_count(labels: Any, mask: Any = None, solidity: float = SOLIDITY) -> int:
    """The patch scored alone: its non-convex objects of at least half its own typical area, rounded down to a
    gate. Right for a patch of whole nuclei; a pool is scored by ``pool_nonconvex``."""
    profile = nonconvex_profile(labels, mask, solidity)
    return int(pool_nonconvex([profile])[0])


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    if not values.size:
        return 0.0
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2)])
