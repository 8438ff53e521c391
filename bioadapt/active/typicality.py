"""Typical patches first: cluster the pool on the model's own features and label the densest patch of each
cluster that holds no label yet.

At small budgets the patches a model is most unsure of are often outliers (an artefact, a clump, an empty
corner), and labelling them teaches little about the rest of the image. Hacohen, Dekel & Weinshall ("Active
learning on a budget", ICML 2022, TypiClust) showed that below a few labels per class, picking *typical*
examples from clusters that have no label yet beats uncertainty and random picks, and that uncertainty only
pays off later. ``select_typical`` follows TypiClust: k-means into (labelled + k) clusters, then, cluster by
cluster from the largest uncovered one, the patch of highest typicality (inverse mean distance to its nearest
neighbours). With ``scores`` (an uncertainty per patch) the typicality is weighted by it, as in Settles &
Craven's information density (2008): typical *and* uncertain. ``select_typical_half_top`` is the hard form of
the same idea (Zhu et al., "Active learning with sampling by uncertainty and density", 2008): the most
uncertain patches, but only from the typical half of the pool, so that an untuned model's uncertainty about
outliers (on the synthetic benchmark pool its two most uncertain windows were the sparsest, at typicality
percentiles 0.13 and 0.27) does not spend the first labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bioadapt.active.selection import checked_pool, weighted_kmeans
from bioadapt.errors import BioadaptError

NEIGHBOURS = 20  # TypiClust's K for the density estimate
MIN_CLUSTER_SIZE = 5  # TypiClust's: smaller clusters are outliers, not typical of anything


def typicality(features: np.ndarray, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """Per patch: 1 / mean Euclidean distance to its ``neighbours`` nearest other patches (high = typical)."""
    features = np.asarray(features, dtype=np.float64)
    n = len(features)
    if n < 2:
        return np.ones(n)
    squared = (features ** 2).sum(1)
    distance = np.sqrt(np.maximum(squared[:, None] + squared[None] - 2 * features @ features.T, 0))
    np.fill_diagonal(distance, np.inf)
    k = min(neighbours, n - 1)
    nearest = np.partition(distance, k - 1, axis=1)[:, :k]
    return 1.0 / (nearest.mean(1) + 1e-12)


def select_typical(features: np.ndarray, k: int, *, labelled: Sequence[int] = (),
                   scores: Sequence[float] | None = None, seed: int = 0) -> list[int]:
    """``k`` new indices (none of ``labelled``): one per cluster of a k-means into len(labelled) + k clusters of
    the standardised ``features`` (n, d), the clusters with the fewest labels first, then the largest (clusters
    of fewer than 5 patches only when no other is left); in each, the patch of highest typicality within its
    cluster (times its score rank in (0, 1] when ``scores`` are given)."""
    features, labelled, k = checked_pool(features, k, labelled)
    n = len(features)
    if k == 0:
        return []
    weight = np.ones(n) if scores is None else _rank_weight(scores, n)
    clusters = weighted_kmeans(features, np.ones(n), min(n, len(labelled) + k), np.random.default_rng(seed))
    sizes = np.bincount(clusters, minlength=clusters.max() + 1)
    # TypiClust leaves out clusters of a few patches (outliers); when nothing else is left they come back
    eligible = sizes >= MIN_CLUSTER_SIZE if (sizes >= MIN_CLUSTER_SIZE).any() else sizes > 0
    labels_in = np.bincount(clusters[labelled], minlength=len(sizes)) if labelled else np.zeros(len(sizes), int)
    taken = np.zeros(n, dtype=bool)
    taken[labelled] = True
    chosen: list[int] = []
    while len(chosen) < k:
        free = np.bincount(clusters[~taken], minlength=len(sizes))
        open_clusters = np.flatnonzero(eligible & (free > 0))
        if not open_clusters.size:
            open_clusters = np.flatnonzero(free > 0)
        # the cluster with the fewest labels, then the largest
        cluster = int(min(open_clusters, key=lambda c: (labels_in[c], -sizes[c], c)))
        members = np.flatnonzero((clusters == cluster) & ~taken)
        value = typicality(features[clusters == cluster])[np.flatnonzero(~taken[clusters == cluster])]
        pick = int(members[np.argmax(value * weight[members])])
        chosen.append(pick)
        taken[pick] = True
        labels_in[cluster] += 1
    return chosen


def select_typical_half_top(scores: Sequence[float], features: np.ndarray, k: int, *,
                            labelled: Sequence[int] = ()) -> list[int]:
    """The ``k`` highest ``scores`` (none of ``labelled``) among the pool's typical half: the patches whose
    typicality on the standardised ``features`` (n, d) is at least its median. When that half has fewer free
    patches than ``k``, the highest-scoring of the rest follow."""
    features, labelled, k = checked_pool(features, k, labelled)
    scores = _checked_scores(scores, len(features))
    value = typicality(features)
    # the typical half first, each half by descending score, equal scores (counts tie) the more typical first
    # (lexsort: the last key is the primary one)
    order = np.lexsort((-value, -scores, value < np.median(value)))
    taken = set(labelled)
    return [int(i) for i in order if i not in taken][:k]


def _rank_weight(scores: Sequence[float], n: int) -> np.ndarray:
    """Scores as ranks scaled into (0, 1]: the scale of an uncertainty measure does not matter, its order does.
    Equal scores (counts) share their mean rank, so the pool's order does not decide between them."""
    from scipy.stats import rankdata

    return rankdata(_checked_scores(scores, n), method="average") / n


def _checked_scores(scores: Sequence[float], n: int) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (n,):
        raise BioadaptError(f"scores must hold one value per patch ({n}), got shape {scores.shape}")
    return scores
