"""Cross-validated verdicts while too few annotated patches are held out: which training patches each extra
fine-tune leaves out, and how their evaluations are pooled."""

from __future__ import annotations

import numpy as np
import pytest

from bioadapt.active.verdict import pooled_f1
from bioadapt.service.holdout import combined, cross_validation_folds
from bioadapt.service.tasks.fine_tune import folds_for


@pytest.mark.parametrize(("train", "held_out", "folds", "expected"), [
    (6, 2, 4, [[0, 3], [1, 4], [2, 5]]),  # 8 labels: the 2 held-out patches are the 4th fold
    (3, 1, 4, [[0], [1], [2]]),  # 4 labels
    (2, 0, 4, [[0], [1]]),  # 2 labels, none held out: each fine-tune trains on the other
    (7, 2, 4, [[0, 3, 6], [1, 4], [2, 5]]),
    (1, 1, 4, [[0]]),  # it trains on the held-out patch
    (1, 0, 4, []),  # one patch: nothing left to train on
    (0, 0, 4, []),
    (2, 2, 2, [[0, 1]]),  # half held out: two folds
])
def test_every_training_patch_is_left_out_by_exactly_one_extra_fine_tune(train, held_out, folds, expected):
    got = cross_validation_folds(train, held_out, folds)
    assert got == expected
    if got:
        assert sorted(i for fold in got for i in fold) == list(range(train))
        assert all(train - len(fold) + held_out >= 1 for fold in got)  # each has something to train on


def test_the_project_share_sets_the_folds_and_enough_held_out_patches_need_none():
    fresh = [False] * 9
    assert folds_for(fresh, 3, 0.25) == []  # 12 labels: 3 held-out patches judge the version alone
    assert len(folds_for(fresh[:6], 2, 0.25)) == 3  # 4 folds, one of them the held-out patches
    assert len(folds_for(fresh[:4], 0, 0.0)) == 4  # nothing ever held out: 4 folds over the training patches
    assert len(folds_for(fresh[:2], 2, 0.5)) == 1
    assert folds_for(fresh[:2], 0, 0.25) == []  # 2 labels: 2 patches cannot judge a version, however split


def test_patches_the_parent_trained_on_are_never_left_out_nor_judged():
    # 8 labels after a 4-label version became the parent: it trained on the first 3 training patches
    seen = [True, True, True, False, False, False]
    assert folds_for(seen, 2, 0.25) == [[3], [4], [5]]
    assert folds_for([True] * 6 + [False], 1, 0.25) == []  # 1 new + 1 held-out patch: too few to judge
    assert folds_for([True, False, True, False], 2, 0.25) == [[1], [3]]


def test_combined_evaluations_pool_their_patches_again():
    first = {"metric": "f1@0.5", "f1": 1.0, "patches": 1, "per_patch": [[4, 0, 0]]}
    second = {"metric": "f1@0.5", "f1": 0.0, "patches": 2, "per_patch": [[0, 3, 1], [1, 1, 2]]}
    both = combined([first, second])
    assert both["per_patch"] == [[4, 0, 0], [0, 3, 1], [1, 1, 2]] and both["patches"] == 3
    assert (both["tp"], both["fp"], both["fn"]) == (5, 4, 3)
    assert both["f1"] == pytest.approx(pooled_f1(np.array(both["per_patch"]))) == pytest.approx(10 / 17)
    dice = combined([{"metric": "dice", "per_patch": [[0.5, True, True]]},
                     {"metric": "dice", "per_patch": [[1.0, True, True]]}])
    assert dice["dice"] == pytest.approx(0.75) and dice["patches"] == 2
