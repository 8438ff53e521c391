"""Choosing patches to annotate: top-k, and top-k made diverse by score-weighted k-means."""

import numpy as np
import pytest

from bioadapt.active import select_diverse, select_top
from bioadapt.errors import BioadaptError


def _two_hot_spots(seed: int = 0):
    """Ten near-identical very uncertain patches at one place, ten fairly uncertain ones elsewhere, and
    twenty certain ones spread out."""
    rng = np.random.default_rng(seed)
    where = np.concatenate([rng.normal((0, 0), 0.01, (10, 2)), rng.normal((5, 5), 0.01, (10, 2)),
                            rng.uniform(-10, 10, (20, 2))])
    scores = np.concatenate([rng.uniform(0.9, 1.0, 10), rng.uniform(0.5, 0.6, 10), rng.uniform(0, 0.05, 20)])
    return scores, where


def test_top_k_takes_the_highest_scores_in_order():
    assert select_top([0.1, 0.5, 0.3, 0.5], 3) == [1, 3, 2]
    assert select_top([0.2], 5) == [0] and select_top([0.2, 0.1], 0) == []


def test_top_k_piles_up_on_one_hot_spot_and_diverse_does_not():
    scores, where = _two_hot_spots()
    top = select_top(scores, 3)
    assert all(i < 10 for i in top)  # all from the same spot
    diverse = select_diverse(scores, where, 3, seed=0)  # candidates: the 12 most uncertain, 2 of them at spot two
    assert len(diverse) == 3 and {i < 10 for i in diverse} == {True, False}
    assert all(i < 20 for i in diverse)  # never a certain patch: only the 4k most uncertain are candidates
    assert diverse[0] == top[0]  # the single most uncertain patch is always kept
    assert diverse == sorted(diverse, key=lambda i: -scores[i])


def test_diverse_selection_is_seeded_and_fills_k():
    scores, where = _two_hot_spots(1)
    assert select_diverse(scores, where, 6, seed=3) == select_diverse(scores, where, 6, seed=3)
    assert len(set(select_diverse(scores, where, 6, seed=3))) == 6
    assert sorted(select_diverse(scores, where, 40)) == list(range(40))


def test_descriptors_must_match_the_scores():
    with pytest.raises(BioadaptError, match="descriptors must be"):
        select_diverse([0.1, 0.2], np.zeros((3, 2)), 1)


def test_every_selection_rule_is_called_the_same_way():
    from bioadapt.active import DEFAULT_SELECTION, SELECTIONS, select

    scores, where = _two_hot_spots()
    assert DEFAULT_SELECTION in SELECTIONS
    assert select("top", 5, scores) == select_top(scores, 5)
    assert select("diverse", 5, scores, where, seed=3) == select_diverse(scores, where, 5, seed=3)
    with pytest.raises(BioadaptError, match="unknown selection 'best'"):
        select("best", 5, scores, where)
