"""The verdict on a fine-tuned version against its parent: worse or better only beyond the noise of the held-out
patches (paired bootstrap), empty versions called out, too few patches said so."""

from __future__ import annotations

import numpy as np
import pytest

from bioadapt.active.verdict import MIN_PATCHES, judge_dice, judge_instances


def _counts(rng, patches: int, recall: float, false_per_patch: float, objects: int = 8) -> list[tuple[int, int, int]]:
    found = rng.binomial(objects, recall, patches)
    return [(int(t), int(f), int(objects - t)) for t, f in zip(found, rng.poisson(false_per_patch, patches))]


def test_a_clearly_worse_version_is_worse_and_a_clearly_better_one_better():
    rng = np.random.default_rng(0)
    good, bad = _counts(rng, 8, 0.9, 0.5), _counts(rng, 8, 0.3, 3.0)
    worse = judge_instances(good, bad)
    assert worse.verdict == "worse" and worse.interval[1] < 0 and worse.difference < -0.3 and not worse.empty
    assert "worse than its parent beyond the noise of the 8 held-out patches" in worse.reason
    better = judge_instances(bad, good)
    assert better.verdict == "better" and better.interval[0] > 0
    assert judge_instances(good, bad).interval == worse.interval  # seeded: the same verdict every time


def test_a_small_difference_on_few_patches_is_within_the_noise():
    rng = np.random.default_rng(1)
    parent = _counts(rng, 4, 0.8, 1.0)
    version = [(tp - 1, fp, fn + 1) if i == 0 else (tp, fp, fn) for i, (tp, fp, fn) in enumerate(parent)]
    verdict = judge_instances(parent, version)  # one object fewer found in one of four patches
    assert verdict.difference < 0 and verdict.verdict == "same"
    assert verdict.interval[0] < 0 <= verdict.interval[1] and "not distinguishable" in verdict.reason


def test_too_few_patches_or_objects_are_undecided_and_say_what_to_do():
    rng = np.random.default_rng(2)
    few = judge_instances(_counts(rng, MIN_PATCHES - 1, 0.9, 0.2), _counts(rng, MIN_PATCHES - 1, 0.1, 5.0))
    assert few.verdict == "undecided" and "annotate more patches" in few.reason
    sparse = judge_instances([(1, 0, 0)] * 4, [(0, 1, 1)] * 4)  # 4 objects in 4 patches
    assert sparse.verdict == "undecided" and sparse.objects == 4


def test_an_empty_version_is_worse_whatever_the_noise():
    parent = [(5, 1, 1)] * 2 + [(6, 0, 0)]
    verdict = judge_instances(parent, [(0, 0, 6), (0, 0, 6), (0, 0, 6)])
    assert verdict.verdict == "worse" and verdict.empty and "almost) empty" in verdict.reason
    assert judge_instances([(0, 0, 6)] * 3, [(0, 0, 6)] * 3).verdict != "worse"  # empty before and after: no news


def test_dice_versions_are_judged_the_same_way():
    rng = np.random.default_rng(3)
    parent = np.clip(rng.normal(0.85, 0.03, 10), 0, 1)
    truth = [True] * 10
    assert judge_dice(parent, parent - 0.3, truth, truth, truth).verdict == "worse"
    assert judge_dice(parent, parent + 0.05, truth, truth, truth).verdict == "better"
    empty = judge_dice(parent, np.zeros(10), truth, [False] * 10, truth)
    assert empty.verdict == "worse" and empty.empty
    assert judge_dice(parent[:2], parent[:2] - 0.5, truth[:2], truth[:2], truth[:2]).verdict == "undecided"
    with pytest.raises(ValueError):
        judge_dice(parent, parent[:3], truth, truth, truth)
