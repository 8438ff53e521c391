"""Uncertainty maps a person can read: where on a patch the model is likely wrong, at the scale of its objects.

The per-pixel acquisition map (BALD) is what patch scores are made of, but shown as it is it reads as speckle:
element dropout draws every pixel's mask on its own, and every object boundary is uncertain, right or wrong. The
maps here pool it over what a person corrects, the model's objects (its segmentation of the patch):

- ``pixel``: the acquisition map itself;
- ``smoothed``: the acquisition map blurred at object scale (a Gaussian of half the median object radius);
- ``object``: each object (grown by one pixel, as ``objects.object_regions`` grows it, with the object-sized
  uncertain blobs outside any object: objects the model may have missed) painted with its mean acquisition;
- ``boundary``: each object painted with the mean acquisition on its contour (a ring one pixel either side of its
  edge), where merges and splits show;
- ``disagreement``: how much the MC passes' own instance segmentations disagree with the model's objects: each
  object painted with 1 - (its mean, over passes, of the best IoU with an object of that pass), so an object the
  passes split or merge with a neighbour stands out; outside the objects, the share of passes that put an object
  there (objects the model may have missed or invented). It needs each pass's instance segmentation.

``DEFAULT_MAP`` is the one the service stores and the clients show, chosen by benchmarks/bench_score_errors.py
(``--maps``): how often the top decile of a map's pixels falls on the base model's actual errors (objects without
a ground-truth match at IoU 0.5, and missed true objects) against a random decile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bioadapt.active.metrics import best_iou
from bioadapt.active.objects import as_numpy, object_regions
from bioadapt.errors import BioadaptError

DEFAULT_MAP = "disagreement"
FALLBACK_MAP = "object"  # the default for models whose passes give no instance segmentations (Cellpose)
DEFAULT_RADIUS = 4.0  # pixels: the object scale of a patch without objects


def object_radius(labels: np.ndarray) -> float:
    """The radius (pixels) of a disc of the median object area; ``DEFAULT_RADIUS`` without objects."""
    areas = np.bincount(labels.ravel().astype(np.int64))[1:]
    areas = areas[areas > 0]
    return float(np.sqrt(np.median(areas) / np.pi)) if areas.size else DEFAULT_RADIUS


def _painted(regions: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each region id i > 0 painted with ``values[i]``; 0 outside regions."""
    table = np.zeros(int(regions.max()) + 1)
    table[: len(values)] = values[: len(table)]
    table[0] = 0.0
    return table[regions]


def _region_means(values: np.ndarray, regions: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Mean of ``values`` per region id (over the pixels in ``where``), indexed by id."""
    keep = np.ones(regions.shape, bool) if where is None else where
    size = int(regions.max()) + 1
    sums = np.bincount(regions[keep].ravel(), weights=values[keep].ravel(), minlength=size)
    counts = np.bincount(regions[keep].ravel(), minlength=size)
    return np.divide(sums, counts, out=np.zeros(size), where=counts > 0)


def pixel_map(score_map: np.ndarray, labels: np.ndarray, pass_labels: np.ndarray | None = None) -> np.ndarray:
    return score_map


def smoothed_map(score_map: np.ndarray, labels: np.ndarray, pass_labels: np.ndarray | None = None) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(score_map, sigma=object_radius(labels) / 2, mode="reflect")


def object_map(score_map: np.ndarray, labels: np.ndarray, pass_labels: np.ndarray | None = None) -> np.ndarray:
    regions = object_regions(labels, score_map)
    return _painted(regions, _region_means(score_map, regions))


def boundary_map(score_map: np.ndarray, labels: np.ndarray, pass_labels: np.ndarray | None = None) -> np.ndarray:
    from scipy import ndimage

    regions = object_regions(labels, score_map)
    highest = ndimage.maximum_filter(labels, size=3)
    edge = highest != ndimage.minimum_filter(labels, size=3)  # one pixel either side of an object's edge
    owner = np.where(labels > 0, labels, highest)
    values = _region_means(score_map, regions)  # missed blobs keep their mean
    contour = _region_means(score_map, owner, edge & (owner > 0))
    values[1:len(contour)] = contour[1:len(values)]
    return _painted(regions, values)


def disagreement_map(score_map: np.ndarray, labels: np.ndarray, pass_labels: np.ndarray | None = None
                     ) -> np.ndarray:
    if pass_labels is None:
        raise BioadaptError("the 'disagreement' map needs each MC pass's instance segmentation; this model gives "
                            f"none: use the {FALLBACK_MAP!r} map")
    pass_labels = np.asarray(pass_labels)
    if pass_labels.shape[1:] != labels.shape:
        raise BioadaptError(f"pass labels of shape {pass_labels.shape} do not fit labels of shape {labels.shape}")
    agreement = np.mean([best_iou(labels, other) for other in pass_labels], axis=0)
    inside = _painted(labels, 1.0 - agreement)
    seen = (pass_labels > 0).mean(0)  # outside the model's objects: how many passes see an object there
    return np.where(labels > 0, inside, seen)


MAPS: dict[str, Callable[..., np.ndarray]] = {
    "pixel": pixel_map, "smoothed": smoothed_map, "object": object_map, "boundary": boundary_map,
    "disagreement": disagreement_map,
}
NEEDS_PASS_LABELS = frozenset({"disagreement"})


def readable_map(name: str, score_map: Any, labels: Any, pass_labels: Any = None) -> np.ndarray:
    """The map ``name`` of ``MAPS`` for one patch, float32 in the patch's shape: from its per-pixel acquisition map
    ``score_map``, the model's instance ``labels`` and, for "disagreement", each pass's instance labels (T, ...)."""
    if name not in MAPS:
        raise BioadaptError(f"unknown map {name!r}; known: {sorted(MAPS)}")
    score_map = as_numpy(score_map).astype(np.float64)
    labels = as_numpy(labels).astype(np.int64)
    if labels.shape != score_map.shape:
        raise BioadaptError(f"labels of shape {labels.shape} do not match the map's shape {score_map.shape}")
    passes = None if pass_labels is None else as_numpy(pass_labels).astype(np.int64)
    return MAPS[name](score_map, labels, passes).astype(np.float32)
