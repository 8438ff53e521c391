"""Whether a fine-tuned model version is better or worse than its parent on the held-out annotated patches.

Both versions segment the same held-out patches, so the comparison is paired: the 95 % interval of (version minus
parent) comes from a bootstrap over patches (the patches are the sample; within a patch, objects share their
context and are not independent). Pooled F1 at IoU 0.5 for instance models (as ``evaluate`` reports it), mean Dice
for semantic ones.

- "worse": the whole interval lies below 0, or the version finds almost nothing (fewer than ``EMPTY_FRACTION`` of
  the annotated objects, or no foreground where the labels hold some) while its parent found more. A worse version
  is not taken as the project's default for scoring, predict and export.
- "better": the whole interval lies above 0.
- "same": the interval holds 0: the held-out set cannot tell the two apart.
- "undecided": fewer than ``MIN_PATCHES`` held-out patches (or ``MIN_OBJECTS`` annotated objects), too few to judge.
  An undecided version is not the project's default either: until labels can judge it, it is used only when named.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MIN_PATCHES = 3
MIN_OBJECTS = 10
EMPTY_FRACTION = 0.1
RESAMPLES = 2000
LEVEL = 0.95
VERDICTS = ("better", "same", "worse", "undecided")


@dataclass(frozen=True)
class Verdict:
    verdict: str  # one of VERDICTS
    metric: str  # "f1@0.5" or "dice"
    parent: float | None  # the parent's score on the held-out patches
    version: float | None  # the version's
    difference: float | None  # version - parent
    interval: tuple[float, float] | None  # LEVEL interval of the difference (paired bootstrap over patches)
    patches: int
    objects: int | None  # annotated objects in the held-out patches (instance models)
    empty: bool  # the version finds (almost) nothing where the labels hold objects
    reason: str  # one sentence a client can show

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge_instances(parent_counts: Sequence[Sequence[int]], version_counts: Sequence[Sequence[int]],
                    seed: int = 0) -> Verdict:
    """``*_counts``: one (tp, fp, fn) per held-out patch, the same patches in the same order for both versions."""
    parent = np.asarray(parent_counts, np.int64).reshape(-1, 3)
    version = np.asarray(version_counts, np.int64).reshape(-1, 3)
    if parent.shape != version.shape:
        raise ValueError(f"both versions must be counted on the same patches: {parent.shape} vs {version.shape}")
    patches = len(parent)
    objects = int(parent[:, 0].sum() + parent[:, 2].sum())  # tp + fn: the annotated objects
    parent_score, version_score = pooled_f1(parent), pooled_f1(version)
    found = {"parent": int(parent[:, 0].sum() + parent[:, 1].sum()), "version": int(version[:, 0].sum()
                                                                                   + version[:, 1].sum())}
    empty = objects > 0 and found["version"] < EMPTY_FRACTION * objects < found["parent"]
    base = {"metric": "f1@0.5", "parent": parent_score, "version": version_score, "patches": patches,
            "objects": objects, "empty": empty}
    if empty:
        return Verdict("worse", difference=version_score - parent_score, interval=None, **base,
                       reason=f"the version finds {found['version']} objects where the {patches} held-out patches "
                              f"hold {objects} (its parent found {found['parent']}): it is (almost) empty")
    if patches < MIN_PATCHES or objects < MIN_OBJECTS:
        return Verdict("undecided", difference=version_score - parent_score, interval=None, **base,
                       reason=f"{patches} held-out patches with {objects} objects are too few to judge (at least "
                              f"{MIN_PATCHES} patches and {MIN_OBJECTS} objects): annotate more patches (until "
                              "then this version is used only when named)")
    rows = np.random.default_rng(seed).integers(0, patches, (RESAMPLES, patches))
    differences = pooled_f1(version[rows].sum(1), axis=-1) - pooled_f1(parent[rows].sum(1), axis=-1)
    return _paired(base, version_score - parent_score, differences)


def judge_dice(parent_dice: Sequence[float], version_dice: Sequence[float], parent_foreground: Sequence[bool],
               version_foreground: Sequence[bool], truth_foreground: Sequence[bool], seed: int = 0) -> Verdict:
    """Per held-out patch: each version's Dice, whether it predicts any foreground, whether the labels hold some."""
    parent, version = np.asarray(parent_dice, float), np.asarray(version_dice, float)
    if parent.shape != version.shape:
        raise ValueError(f"both versions must be scored on the same patches: {parent.shape} vs {version.shape}")
    truth = np.asarray(truth_foreground, bool)
    with_objects = int(truth.sum())
    version_found = int((np.asarray(version_foreground, bool) & truth).sum())
    parent_found = int((np.asarray(parent_foreground, bool) & truth).sum())
    patches = len(parent)
    parent_score = float(parent.mean()) if patches else None
    version_score = float(version.mean()) if patches else None
    difference = None if not patches else version_score - parent_score
    empty = with_objects > 0 and version_found == 0 < parent_found
    base = {"metric": "dice", "parent": parent_score, "version": version_score, "patches": patches,
            "objects": None, "empty": empty}
    if empty:
        return Verdict("worse", difference=difference, interval=None, **base,
                       reason=f"the version predicts no foreground in any of the {with_objects} held-out patches "
                              "whose labels hold some (its parent did)")
    if patches < MIN_PATCHES:
        return Verdict("undecided", difference=difference, interval=None, **base,
                       reason=f"{patches} held-out patches are too few to judge (at least {MIN_PATCHES}): annotate "
                              "more patches (until then this version is used only when named)")
    rows = np.random.default_rng(seed).integers(0, patches, (RESAMPLES, patches))
    return _paired(base, difference, (version[rows] - parent[rows]).mean(1))


def _paired(base: dict[str, Any], difference: float, resampled: np.ndarray) -> Verdict:
    tail = (1 - LEVEL) / 2 * 100
    low, high = (float(v) for v in np.percentile(resampled, [tail, 100 - tail]))
    verdict = "worse" if high < 0 else "better" if low > 0 else "same"
    words = {"worse": "worse than its parent beyond the noise of",
             "better": "better than its parent beyond the noise of",
             "same": "not distinguishable from its parent on"}[verdict]
    reason = (f"{base['metric']} {base['version']:.3f} vs its parent's {base['parent']:.3f} "
              f"({difference:+.3f}, {LEVEL:.0%} interval {low:+.3f} to {high:+.3f}): {words} the "
              f"{base['patches']} held-out patches")
    return Verdict(verdict, difference=difference, interval=(low, high), reason=reason, **base)


def pooled_f1(counts: np.ndarray, axis: int | None = None) -> Any:
    """2 tp / (2 tp + fp + fn) of counts summed over patches (axis None: rows of one (P, 3) array; axis -1: the
    last axis holds (tp, fp, fn) of already summed resamples); 1.0 where there was nothing to find or found."""
    totals = counts.sum(0) if axis is None else counts
    tp, fp, fn = (np.take(totals, i, axis=-1) for i in range(3))
    denominator = 2 * tp + fp + fn
    f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)
    return float(f1) if axis is None else f1
