"""Shape outliers: the model's objects that look like touching nuclei merged into one.

MC dropout cannot see a merge the model makes with confidence: the passes agree, BALD is low on the merged blob
and its object score is too. Its shape shows it: two round nuclei joined are not convex. A patch's ``nonconvex``
score counts the model's objects of nucleus size (at least half the patch's typical object area: the median over
its foreground pixels of their object's area, so tiny fragments neither count nor set the size) whose solidity
(area over convex-hull area) is below ``SOLIDITY``. On the real pools of benchmarks/pick_errors.py the patches
with the highest counts hold 2 to 5 times a random patch's missed true objects, while BALD's top patches hold
fewer than a random one's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bioadapt.active.objects import as_numpy

SOLIDITY = 0.9


def typical_area(labels: np.ndarray) -> float:
    """The median over the foreground pixels of their object's area (0 without objects)."""
    areas = np.bincount(labels.ravel())[1:]
    areas = np.sort(areas[areas > 0])
    return float(np.repeat(areas, areas)[areas.sum() // 2]) if areas.size else 0.0


def nonconvex_count(labels: Any, mask: Any = None, solidity: float = SOLIDITY) -> int:
    """How many nucleus-sized objects of ``labels`` (2D or 3D) are less solid than ``solidity``; with ``mask``
    only objects with a pixel inside it count."""
    from skimage.measure import regionprops

    labels = as_numpy(labels).astype(np.int64)
    least = typical_area(labels) / 2
    inside = None if mask is None else set(np.unique(labels[as_numpy(mask).astype(bool)]).tolist())
    return sum(1 for region in regionprops(labels)
               if region.area >= least and region.solidity < solidity and (inside is None or region.label in inside))
