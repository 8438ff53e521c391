"""Selection strategies over a scored pool, by name, and the strategy the service uses by default.

Scoring (a per-pixel acquisition map reduced to one number per patch, and optionally a feature vector per
patch from the model) is separate from selection, which only reads those numbers and picks: the service scores
in its workers and selects over the whole pool. ``select`` takes the pool's scores, features and the indices
already labelled, and returns the new picks, best first.

The default, ``typical_half_nonconvex_then_typical``, was chosen by benchmarks/service_al.py (through the
service with its defaults, from the zoo's ``unet2d_nuclei_broad`` with its real weights, 9 seeds; docs/strategies.md):
on Kromp's nuclei it reached random's F1 at 16 labels with 8 and was above random at 8 labels, and on neither
Kromp nor BBBC039 was it below random at any budget, while the former default,
``typical_half_object_bald_then_typical``, fell below random at 16 labels on Kromp. While nothing is labelled it
takes the patches with the most merged-looking objects (``nonconvex``: the model's objects of nucleus size that are
not convex, which MC dropout cannot see, as the model merges touching nuclei with confidence) among the typical half
of the pool (typicality on the model's features at least its median); once labels exist it weighs those counts by
typicality, round by round. Object BALD (the former default's score) ranks first windows of one or two nuclei the
model already segments well; typicality alone (``typical_bald``) picks empty background windows of a sparse image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bioadapt.active.coreset import select_coreset
from bioadapt.active.selection import select_diverse, select_top
from bioadapt.active.typicality import select_typical, select_typical_half_top
from bioadapt.errors import BioadaptError


def _top(scores: np.ndarray, features: np.ndarray | None, k: int, labelled: list[int], seed: int) -> list[int]:
    masked = scores.copy()
    masked[labelled] = -np.inf
    return select_top(masked, k)


def _diverse(scores: np.ndarray, features: np.ndarray | None, k: int, labelled: list[int], seed: int) -> list[int]:
    free = np.setdiff1d(np.arange(len(scores)), labelled)
    return [int(free[i]) for i in select_diverse(scores[free], features[free], k, seed=seed)]


def _typical(scores: np.ndarray, features: np.ndarray | None, k: int, labelled: list[int], seed: int) -> list[int]:
    return select_typical(features, k, labelled=labelled, seed=seed)


def _typical_uncertain(scores: np.ndarray, features: np.ndarray | None, k: int, labelled: list[int],
                       seed: int) -> list[int]:
    return select_typical(features, k, labelled=labelled, scores=scores, seed=seed)


def _typical_cold_start(scores: np.ndarray, features: np.ndarray | None, k: int, labelled: list[int],
                        seed: int) -> list[int]:
    """Typical patches while nothing is labelled (the model's uncertainty says little about the target yet),
    typical and uncertain ones once labels exist."""
    return select_typical(features, k, labelled=labelled, scores=scores if labelled else None, seed=seed)


def _typical_half_top(scores: np.ndarray, features: np.ndarray | None, k: int, labelled: list[int],
                      seed: int) -> list[int]:
    return select_typical_half_top(scores, features, k, labelled=labelled)


def _until_labelled(first: "Selector", then: "Selector") -> "Selector":
    """A rule that picks by ``first`` while nothing is labelled and by ``then`` once labels exist."""
    def selector(scores: np.ndarray, features: np.ndarray | None, k: int, labelled: list[int],
                 seed: int) -> list[int]:
        return (then if labelled else first)(scores, features, k, labelled, seed)
    return selector


def _coreset(scores: np.ndarray, features: np.ndarray | None, k: int, labelled: list[int], seed: int) -> list[int]:
    return select_coreset(features, k, labelled=labelled)


def _random(scores: np.ndarray, features: np.ndarray | None, k: int, labelled: list[int], seed: int) -> list[int]:
    free = np.setdiff1d(np.arange(len(scores)), labelled)
    return [int(i) for i in np.random.default_rng(seed).permutation(free)[:k]]


Selector = Callable[[np.ndarray, "np.ndarray | None", int, list[int], int], list[int]]

# name -> (selector, whether it needs a feature vector per patch)
SELECTIONS: dict[str, tuple[Selector, bool]] = {
    "top": (_top, False),
    "diverse": (_diverse, True),
    "typical": (_typical, True),
    "typical_uncertain": (_typical_uncertain, True),
    "typical_cold_start": (_typical_cold_start, True),
    "coreset": (_coreset, True),
    "top_then_typical": (_until_labelled(_top, _typical_uncertain), True),
    "typical_half_top": (_typical_half_top, True),
    "typical_half_top_then_typical": (_until_labelled(_typical_half_top, _typical_uncertain), True),
    "random": (_random, False),
}


@dataclass(frozen=True)
class Strategy:
    """What a scoring round computes per patch (an acquisition map and how it becomes one number) and how the
    pool is then picked from."""

    acquisition: str = "bald"
    reduce: str = "mean"  # "mean", "max", "quantile" of the map, "object_mean", "object_sum", "object_max", "nonconvex"
    selection: str = "top"

    @property
    def needs_features(self) -> bool:
        return SELECTIONS[self.selection][1]


STRATEGIES: dict[str, Strategy] = {
    "bald": Strategy("bald", "mean", "top"),
    "bald_diverse": Strategy("bald", "mean", "diverse"),
    "object_bald": Strategy("bald", "object_mean", "top"),
    "object_bald_then_typical": Strategy("bald", "object_mean", "top_then_typical"),
    "typical_half_object_bald": Strategy("bald", "object_mean", "typical_half_top"),
    "typical_half_object_bald_then_typical": Strategy("bald", "object_mean", "typical_half_top_then_typical"),
    "nonconvex": Strategy("bald", "nonconvex", "top"),
    "typical_half_nonconvex_then_typical": Strategy("bald", "nonconvex", "typical_half_top_then_typical"),
    "typical": Strategy("bald", "mean", "typical"),
    "typical_bald": Strategy("bald", "mean", "typical_uncertain"),
    "typical_object_bald": Strategy("bald", "object_mean", "typical_uncertain"),
    "typical_cold_start": Strategy("bald", "mean", "typical_cold_start"),
    "coreset": Strategy("bald", "mean", "coreset"),
    "random": Strategy("random", "mean", "random"),
}

DEFAULT_STRATEGY = "typical_half_nonconvex_then_typical"
DEFAULT_ACQUISITION = STRATEGIES[DEFAULT_STRATEGY].acquisition
DEFAULT_REDUCE = STRATEGIES[DEFAULT_STRATEGY].reduce
DEFAULT_SELECTION = STRATEGIES[DEFAULT_STRATEGY].selection


def select(selection: str, k: int, scores: Sequence[float], features: np.ndarray | None = None, *,
           labelled: Sequence[int] = (), seed: int = 0) -> list[int]:
    """``k`` new pool indices (never one of ``labelled``) by the named selection rule, from the pool's
    ``scores`` (n,) and, for rules that need them, its ``features`` (n, d)."""
    if selection not in SELECTIONS:
        raise BioadaptError(f"unknown selection {selection!r}; known: {sorted(SELECTIONS)}")
    selector, needs_features = SELECTIONS[selection]
    scores = np.asarray(scores, dtype=np.float64)
    labelled = sorted({int(i) for i in labelled})
    if any(not 0 <= i < len(scores) for i in labelled):
        raise BioadaptError(f"labelled indices must lie in [0, {len(scores)}), got {labelled}")
    if needs_features:
        if features is None:
            raise BioadaptError(f"selection {selection!r} needs a feature vector per patch; score with features "
                                "(Adapter.patch_features) or pick 'top' or 'random'")
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) != len(scores):
            raise BioadaptError(f"features must be (n, d) with n = {len(scores)} patches, got {features.shape}")
    k = min(max(0, int(k)), len(scores) - len(labelled))
    return selector(scores, features, k, labelled, seed) if k else []
