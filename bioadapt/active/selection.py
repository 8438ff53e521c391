"""Choosing which scored patches to annotate: the k highest, or k that are both uncertain and unlike each other.

Top-k by BALD tends to pick near-duplicates (neighbouring patches of the same hard region): each extra one
teaches the model little. ``select_diverse`` follows Zhdanov's "diverse mini-batch active learning" (2019):
pre-filter the most uncertain candidates, cluster them with k-means weighted by their scores, and take the most
uncertain patch of each cluster. It is cheap (no extra forward passes, unlike BatchBALD's joint entropies,
which grow with k and the number of MC samples) and works on any descriptor: here where a patch sits and
what it looks like.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bioadapt.errors import BioadaptError


def select_top(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` highest scores, highest first (ties: lower index first)."""
    scores = np.asarray(scores, dtype=np.float64)
    return [int(i) for i in np.argsort(-scores, kind="stable")[:max(0, k)]]


def select_diverse(scores: Sequence[float], descriptors: np.ndarray, k: int, *, candidates: int | None = None,
                   seed: int = 0, iterations: int = 25) -> list[int]:
    """``k`` indices: from the ``candidates`` (default 4k) highest-scoring patches, one per cluster of a
    score-weighted k-means on the standardised ``descriptors`` (n, d), each the cluster's highest-scoring
    patch; ordered by score."""
    scores = np.asarray(scores, dtype=np.float64)
    descriptors = np.asarray(descriptors, dtype=np.float64)
    if descriptors.ndim != 2 or len(descriptors) != len(scores):
        raise BioadaptError(f"descriptors must be (n, d) with n = {len(scores)} scores, got {descriptors.shape}")
    if k <= 0:
        return []
    pool = select_top(scores, min(len(scores), candidates or 4 * k))
    if len(pool) <= k:
        return pool
    features = standardised(descriptors[pool])
    weights = np.clip(scores[pool], 1e-12, None)
    assignment = weighted_kmeans(features, weights, k, np.random.default_rng(seed), iterations)
    chosen = []
    for cluster in range(k):
        members = [pool[i] for i in np.flatnonzero(assignment == cluster)]
        if members:
            chosen.append(max(members, key=lambda i: (scores[i], -i)))
    for i in pool:  # empty clusters: fill with the next most uncertain
        if len(chosen) >= k:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen, key=lambda i: (-scores[i], i))


def standardised(descriptors: np.ndarray) -> np.ndarray:
    """(n, d) descriptors with every column at mean 0 and standard deviation 1 (constant columns left at 0)."""
    descriptors = np.asarray(descriptors, dtype=np.float64)
    if descriptors.ndim != 2:
        raise BioadaptError(f"descriptors must be (n, d), got shape {descriptors.shape}")
    spread = descriptors.std(axis=0)
    return (descriptors - descriptors.mean(axis=0)) / np.where(spread > 0, spread, 1.0)


def checked_pool(features: np.ndarray, k: int, labelled: Sequence[int]) -> tuple[np.ndarray, list[int], int]:
    """Standardised ``features`` (n, d), the sorted distinct ``labelled`` indices (checked to lie in the pool) and
    ``k`` clipped to the unlabelled patches left."""
    features = standardised(features)
    n = len(features)
    labelled = sorted({int(i) for i in labelled})
    if any(not 0 <= i < n for i in labelled):
        raise BioadaptError(f"labelled indices must lie in [0, {n}), got {labelled}")
    return features, labelled, min(max(0, k), n - len(labelled))


def weighted_kmeans(points: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator,
                    iterations: int = 25) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding, every point counted with its weight; returns cluster ids."""
    centres = [points[rng.choice(len(points), p=weights / weights.sum())]]
    for _ in range(1, k):
        distance = np.min([((points - c) ** 2).sum(axis=1) for c in centres], axis=0) * weights
        total = distance.sum()
        centres.append(points[rng.choice(len(points), p=distance / total)] if total > 0
                       else points[rng.integers(len(points))])
    centres = np.array(centres)
    assignment = np.zeros(len(points), dtype=int)
    for step in range(iterations):
        distance = ((points[:, None, :] - centres[None]) ** 2).sum(axis=2)
        new = distance.argmin(axis=1)
        if step > 0 and np.array_equal(new, assignment):
            break
        assignment = new
        for cluster in range(k):
            members = assignment == cluster
            if members.any():
                centres[cluster] = np.average(points[members], axis=0, weights=weights[members])
    return assignment
