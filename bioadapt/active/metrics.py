"""Segmentation quality: instance matching at an IoU threshold (F1, average precision) and Dice.

Instance label images hold 0 for background and any non-negative integer id per object, in 2D (YX) or
3D (ZYX). A predicted and a true object match when their IoU is at least the threshold, as in Cellpose's
and StarDist's metrics. From 0.5 up an object can overlap at most one partner that much, so the
matching needs no assignment step; the one exception, IoU exactly 0.5 with both halves of a split
object, is resolved by keeping one of the two pairs, which is what an optimal assignment does too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bioadapt.errors import BioadaptError


@dataclass(frozen=True)
class MatchResult:
    """Counts from matching one predicted label image to its ground truth.

    ``mean_iou`` is the mean IoU of the matched pairs, NaN when nothing matched.
    """

    tp: int
    fp: int
    fn: int
    mean_iou: float
    iou_threshold: float

    @property
    def f1(self) -> float:
        return _f1(self.tp, self.fp, self.fn)

    @property
    def average_precision(self) -> float:
        return _average_precision(self.tp, self.fp, self.fn)


def _f1(tp: int, fp: int, fn: int) -> float:
    """2 tp / (2 tp + fp + fn); 1.0 when there was nothing to find and nothing was found."""
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def _average_precision(tp: int, fp: int, fn: int) -> float:
    """tp / (tp + fp + fn), Cellpose's and StarDist's "AP" at one threshold; 1.0 when both are empty."""
    return 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn)


def _labels(image: Any, name: str) -> np.ndarray:
    """A non-negative integer label array, or a BioadaptError that says how to get one."""
    array = np.asarray(image)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise BioadaptError(f"{name} must be an integer label image, got dtype {array.dtype}; "
                            "convert it with .astype(np.int64) if its values are whole object ids")
    if array.size and array.min() < 0:
        raise BioadaptError(f"{name} holds negative labels (down to {array.min()}); "
                            "use 0 for background and positive ids for objects")
    return array


def _label_pair(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = _labels(pred, "pred"), _labels(truth, "truth")
    if pred.shape != truth.shape:
        raise BioadaptError(f"pred has shape {pred.shape} but truth has shape {truth.shape}; "
                            "compare label images of the same region and resolution level")
    return pred, truth


def _overlapping_pairs(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct (pred id, truth id) pairs among paired foreground pixels, and each pair's pixel count."""
    span = int(truth.max()) + 1 if truth.size else 1
    if pred.size == 0 or (int(pred.max()) + 1) * span < 2**63:  # one int64 key per pixel: one fast sort
        keys, counts = np.unique(pred.astype(np.int64) * span + truth.astype(np.int64), return_counts=True)
        pair_pred, pair_truth = np.divmod(keys, span)
        return pair_pred.astype(pred.dtype), pair_truth.astype(truth.dtype), counts  # for exact searchsorted
    pairs, counts = np.unique(np.stack([pred, truth], axis=1), axis=0, return_counts=True)  # huge ids
    return pairs[:, 0], pairs[:, 1], counts


def best_iou(labels: Any, other: Any) -> np.ndarray:
    """For each object of ``labels``, its largest IoU with an object of ``other`` (same shape): an array indexed by
    label id (0 for the background and for ids that do not occur)."""
    labels, other = _label_pair(labels, other)
    ids, area = np.unique(labels, return_counts=True)
    other_ids, other_area = np.unique(other, return_counts=True)
    best = np.zeros(int(ids.max()) + 1 if ids.size else 1)
    both = (labels > 0) & (other > 0)
    pair_labels, pair_other, overlap = _overlapping_pairs(labels[both], other[both])
    if overlap.size:
        union = area[np.searchsorted(ids, pair_labels)] + other_area[np.searchsorted(other_ids, pair_other)]
        np.maximum.at(best, pair_labels.astype(np.int64), overlap / (union - overlap))
    return best


def match_instances(pred: np.ndarray, truth: np.ndarray, iou_threshold: float = 0.5) -> MatchResult:
    """Match predicted objects to true objects by IoU >= ``iou_threshold`` (0.5 to 1).

    All pairwise overlaps come from one np.unique over the paired foreground labels, so the cost is a
    few sorts of the pixels, whatever the number of objects.
    """
    if not 0.5 <= iou_threshold <= 1:
        raise BioadaptError(f"iou_threshold must lie in [0.5, 1], got {iou_threshold}: below 0.5 one object "
                            "can overlap several partners that much, and matching then needs an assignment "
                            "step (Hungarian matching) that bioadapt does not do")
    pred, truth = _label_pair(pred, truth)
    if pred.ndim not in (2, 3):
        raise BioadaptError(f"label images must be 2D (YX) or 3D (ZYX), got shape {pred.shape}; "
                            "drop singleton axes and match each time point or channel on its own")
    pred_ids, pred_area = np.unique(pred, return_counts=True)
    truth_ids, truth_area = np.unique(truth, return_counts=True)
    both = (pred > 0) & (truth > 0)
    pair_pred, pair_truth, overlap = _overlapping_pairs(pred[both], truth[both])
    union = pred_area[np.searchsorted(pred_ids, pair_pred)] + truth_area[np.searchsorted(truth_ids, pair_truth)]
    iou = overlap / (union - overlap)

    candidate = iou >= iou_threshold
    pair_pred, pair_truth, iou = pair_pred[candidate], pair_truth[candidate], iou[candidate]
    # Only exact 0.5 ties share an object, and then the shared object is the only conflict:
    # keeping the first pair per predicted object, then per true object, leaves a maximum matching.
    for side in (0, 1):
        _, first = np.unique((pair_pred, pair_truth)[side], return_index=True)
        pair_pred, pair_truth, iou = pair_pred[first], pair_truth[first], iou[first]

    n_pred = int(np.count_nonzero(pred_ids))
    n_truth = int(np.count_nonzero(truth_ids))
    tp = len(iou)
    return MatchResult(tp=tp, fp=n_pred - tp, fn=n_truth - tp, mean_iou=float(iou.mean()) if tp else float("nan"),
                       iou_threshold=float(iou_threshold))


def f1_score(pred: np.ndarray, truth: np.ndarray, iou_threshold: float = 0.5) -> float:
    """Object-level F1 = 2 tp / (2 tp + fp + fn) at ``iou_threshold``; 1.0 when both images are empty."""
    return match_instances(pred, truth, iou_threshold).f1


def average_precision(pred: np.ndarray, truth: np.ndarray, iou_threshold: float = 0.5) -> float:
    """Cellpose's and StarDist's AP at one threshold: tp / (tp + fp + fn); 1.0 when both images are empty."""
    return match_instances(pred, truth, iou_threshold).average_precision


def summarize_matches(results: Sequence[MatchResult]) -> dict[str, Any]:
    """Pool the counts of many images (the usual dataset score): tp, fp, fn, f1, ap and mean matched IoU."""
    results = list(results)
    if not results:
        raise BioadaptError("summarize_matches got no results; match at least one image first")
    thresholds = sorted({result.iou_threshold for result in results})
    if len(thresholds) > 1:
        raise BioadaptError(f"the results were matched at different IoU thresholds {thresholds}; "
                            "summarize each threshold on its own")
    tp = sum(result.tp for result in results)
    fp = sum(result.fp for result in results)
    fn = sum(result.fn for result in results)
    iou_sum = sum(result.tp * result.mean_iou for result in results if result.tp)
    return {"images": len(results), "iou_threshold": thresholds[0], "tp": tp, "fp": fp, "fn": fn,
            "f1": _f1(tp, fp, fn), "ap": _average_precision(tp, fp, fn),
            "mean_iou": iou_sum / tp if tp else float("nan")}


def dice(pred: np.ndarray, truth: np.ndarray, classes: Sequence[int] | None = None) -> float:
    """Mean Dice 2|P & T| / (|P| + |T|) over the foreground classes of two semantic label maps.

    Every label > 0 is a class; ``classes`` restricts the mean to those. A binary mask is one class, so
    this is plain Dice. Classes absent from both maps are left out of the mean; when every class is
    absent (both maps empty) the result is 1.0.
    """
    pred, truth = _label_pair(pred, truth)
    if classes is None:
        wanted = np.union1d(np.unique(pred), np.unique(truth))
        wanted = wanted[wanted > 0]
    else:
        wanted = np.unique(np.asarray(list(classes)))
        if wanted.size and (not np.issubdtype(wanted.dtype, np.integer) or wanted.min() <= 0):
            raise BioadaptError(f"classes must be positive integer labels, got {list(classes)}; "
                                "0 is background and is never scored")

    def counts(labels: np.ndarray) -> np.ndarray:
        """Pixels of each wanted class in ``labels``."""
        ids, number = np.unique(labels, return_counts=True)
        scored = np.isin(ids, wanted)
        found = np.zeros(len(wanted), dtype=np.int64)
        found[np.searchsorted(wanted, ids[scored])] = number[scored]
        return found

    both = counts(pred[pred == truth])
    sizes = counts(pred) + counts(truth)
    present = sizes > 0
    if not present.any():
        return 1.0
    return float(np.mean(2 * both[present] / sizes[present]))
