"""Core-set selection: label the patches that leave no part of the pool far from a labelled one.

Sener & Savarese ("Active learning for convolutional neural networks: a core-set approach", ICLR 2018): the
greedy k-center pick, each new patch the one farthest (in the model's feature space) from every labelled or
already picked patch, bounds how far any pool patch is from the training set. It uses no uncertainty at all,
so it is the pure-diversity reference beside ``select_typical`` (density) and the BALD rankings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bioadapt.active.selection import checked_pool


def select_coreset(features: np.ndarray, k: int, *, labelled: Sequence[int] = ()) -> list[int]:
    """``k`` new indices by greedy k-center on the standardised ``features`` (n, d); without labels the first
    pick is the patch closest to the pool's mean (the most central one), so the result is deterministic."""
    features, labelled, k = checked_pool(features, k, labelled)
    n = len(features)
    chosen: list[int] = []
    if k == 0:
        return chosen
    if labelled:
        nearest = np.min([((features - features[i]) ** 2).sum(1) for i in labelled], axis=0)
    else:
        first = int(np.argmin((features ** 2).sum(1)))
        chosen.append(first)
        nearest = ((features - features[first]) ** 2).sum(1)
    while len(chosen) < k:
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, ((features - features[pick]) ** 2).sum(1))
    return chosen
