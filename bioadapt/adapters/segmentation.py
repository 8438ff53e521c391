"""From class probabilities to label images, by the layout of the model's outputs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from bioadapt.adapters.targets import Targets
from bioadapt.errors import BioadaptError


def instances_from_foreground(foreground: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Connected components of the foreground probability."""
    labels, _ = ndimage.label(foreground > threshold)
    return labels.astype(np.int32)


def instances_from_boundaries(foreground: np.ndarray, boundaries: np.ndarray, threshold: float = 0.5,
                              min_seed_size: int = 4) -> np.ndarray:
    """Seeded watershed: seeds are foreground away from boundaries, flooded over the boundary map inside the
    foreground. Seeds smaller than ``min_seed_size`` pixels are dropped (noise would split cells)."""
    mask = foreground > threshold
    seeds, n = ndimage.label(mask & (boundaries < threshold))
    if n:
        sizes = np.bincount(seeds.ravel())
        small = sizes < min_seed_size
        small[0] = False
        seeds[small[seeds]] = 0
    labels = watershed(boundaries, markers=seeds, mask=mask)
    # foreground that no seed reached (thin cells with no interior) keeps its own components
    orphans, _ = ndimage.label(mask & (labels == 0))
    if orphans.max():
        labels = np.where(orphans > 0, orphans + labels.max(), labels)
    return labels.astype(np.int32)


def instances_from_affinities(affinities: np.ndarray, offsets: Sequence[Sequence[int]],
                              foreground: np.ndarray | None = None, threshold: float = 0.5) -> np.ndarray:
    """Instances from affinities in torch-em's convention (1: the pixel and the one at the offset belong to
    different objects): the boundary map is the mean of the nearest-neighbour channels, split by seeded watershed;
    without a foreground channel every pixel belongs to some object."""
    nearest = [k for k, o in enumerate(offsets) if sum(abs(v) for v in o) == 1] or list(range(len(offsets)))
    boundaries = affinities[nearest].mean(0)
    mask = np.ones(boundaries.shape, bool) if foreground is None else foreground > threshold
    return instances_from_boundaries(mask.astype(np.float32), boundaries, threshold)


def labels_from_probabilities(proba: np.ndarray, output_kind: str, targets: Targets | None = None) -> np.ndarray:
    """(K, *spatial) probabilities -> (*spatial) int32 labels.

    softmax: argmax classes. sigmoid with one channel: connected components of the foreground; two channels
    (foreground, boundaries: the usual bioimage.io U-Net layout): instances by seeded watershed; affinities (see
    ``targets``): seeded watershed on their boundaries; more channels: the most probable channel + 1 where it is
    above 0.5, else 0 (semantic).
    """
    if targets is not None and targets.kind == "affinities":
        channels = proba[1:] if targets.foreground_channel else proba
        return instances_from_affinities(channels, targets.offsets, proba[0] if targets.foreground_channel else None)
    if output_kind == "softmax":
        return proba.argmax(0).astype(np.int32)
    if output_kind != "sigmoid":
        raise BioadaptError(f"no segmentation rule for output kind {output_kind!r}")
    if proba.shape[0] == 1:
        return instances_from_foreground(proba[0])
    if proba.shape[0] == 2:
        return instances_from_boundaries(proba[0], proba[1])
    best = proba.argmax(0)
    return np.where(proba.max(0) > 0.5, best + 1, 0).astype(np.int32)


def instance_f1(proba: np.ndarray, truth: np.ndarray, valid: np.ndarray, output_kind: str,
                targets: Targets | None = None, iou: float = 0.5) -> float:
    """F1 at IoU ``iou`` of the instances segmented from (N, K, *s) probabilities against (N, *s) true instance
    labels, counted over all N images together and only where ``valid`` (N, *s) holds; 1.0 where neither holds an
    object. What fine-tuning validates by when the project is judged by objects, not pixels."""
    from skimage.metrics import contingency_table

    tp = fp = fn = 0
    for p, t, v in zip(proba, truth, valid):
        predicted = np.where(v, labels_from_probabilities(p, output_kind, targets), 0).ravel()
        true = np.where(v, t, 0).ravel()
        overlap = contingency_table(true, predicted).tocoo()
        objects = (overlap.row > 0) & (overlap.col > 0)
        rows, cols, shared = overlap.row[objects], overlap.col[objects], overlap.data[objects]
        true_area, pred_area = np.bincount(true), np.bincount(predicted)
        n_true, n_pred = int((true_area[1:] > 0).sum()), int((pred_area[1:] > 0).sum())
        union = true_area[rows] + pred_area[cols] - shared
        matched = int((shared >= iou * union).sum())  # above 0.5 IoU, each object matches one at most
        tp, fp, fn = tp + matched, fp + n_pred - matched, fn + n_true - matched
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
