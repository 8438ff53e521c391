"""The nonconvex patch score: merged-looking objects counted from the model's labels, what MC dropout misses."""

from __future__ import annotations

import numpy as np
import pytest

from bioadapt.active import patch_score
from bioadapt.active.shapes import AREA_GATES, nonconvex_count, nonconvex_profile, pool_gate, pool_nonconvex, typical_area
from bioadapt.errors import BioadaptError


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.indices(shape)
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def _labels() -> np.ndarray:
    """Three round nuclei, one pair of touching nuclei merged into one object, one L-shaped speck."""
    labels = np.zeros((96, 96), np.int64)
    for i, centre in enumerate([(15, 15), (15, 45), (15, 75)], start=1):
        labels[_disc(labels.shape, centre, 9)] = i
    labels[_disc(labels.shape, (60, 30), 9) | _disc(labels.shape, (60, 46), 9)] = 4  # the merged pair
    labels[85:88, 85] = 5
    labels[87, 85:88] = 5  # a 5-pixel L: not convex, but no nucleus
    return labels


def test_only_the_merged_pair_counts():
    labels = _labels()
    assert nonconvex_count(labels) == 1
    assert nonconvex_count(np.where(labels == 4, 0, labels)) == 0  # round nuclei and the speck: none
    assert nonconvex_count(np.zeros((8, 8), np.int64)) == 0


def test_the_typical_area_is_the_nuclei_s_not_the_fragments():
    labels = _labels()
    fragments = labels.copy()
    for i in range(20):  # many one-pixel fragments move an object median, not the pixel-weighted one
        fragments[40 + i, 90] = 10 + i
    nucleus = int((labels == 1).sum())
    assert typical_area(fragments) == typical_area(labels) == nucleus
    assert nonconvex_count(fragments) == 1


def _specks(seed: int = 0) -> np.ndarray:
    """A patch of texture the model broke into 56 irregular specks (L shapes two pixels thick, 20 to 32 pixels),
    no nucleus."""
    labels = np.zeros((96, 96), np.int64)
    rng = np.random.default_rng(seed)
    for i in range(56):
        y, x = divmod(i, 8)
        y, x, arm = 2 + 12 * y, 2 + 12 * x, int(rng.integers(6, 10))
        labels[y:y + arm, x:x + 2] = labels[y + arm - 2:y + arm, x:x + arm] = i + 1
    return labels


def test_the_pool_sets_the_nucleus_size_so_specks_do_not_count():
    """Alone, the speck patch's own typical area is a speck's and it counts dozens; in a pool of nuclei the gate is
    the nuclei's and it counts none, while each merged pair still counts."""
    nuclei, specks = _labels(), _specks()
    assert nonconvex_count(specks) > 30
    profiles = [nonconvex_profile(x) for x in (nuclei, nuclei, specks, nuclei, np.zeros((96, 96), int))]
    assert pool_gate(profiles) == max(g for g in AREA_GATES if g <= typical_area(nuclei) / 2)
    assert pool_nonconvex(profiles) == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_a_mask_counts_only_the_objects_it_reaches():
    labels = _labels()
    mask = np.zeros(labels.shape, bool)
    mask[:40] = True  # the three round nuclei only
    assert nonconvex_count(labels, mask) == 0
    mask[55, 30] = True  # one pixel of the merged pair
    assert nonconvex_count(labels, mask) == 1


def test_patch_score_nonconvex_counts_from_the_labels_and_ignores_the_map():
    labels = _labels()
    for score_map in (np.zeros(labels.shape), np.random.default_rng(0).random(labels.shape)):
        assert patch_score(score_map, None, reduce="nonconvex", labels=labels) == 1.0
    with pytest.raises(BioadaptError, match="pass the model's labels"):
        patch_score(np.zeros(labels.shape), reduce="nonconvex")


def test_equal_counts_are_decided_by_typicality_not_by_pool_order():
    """Counts tie often; the typical half's top and the typicality weights must not fall back on pool order."""
    from bioadapt.active.typicality import _rank_weight, select_typical_half_top, typicality

    features = np.random.default_rng(1).normal(size=(40, 3))
    value = typicality(features)
    typical = np.flatnonzero(value >= np.median(value))
    scores = np.zeros(40)
    scores[typical[[0, 3]]] = 2.0
    tied = sorted((i for i in typical if scores[i] == 0), key=lambda i: -value[i])
    assert select_typical_half_top(scores, features, 4) == sorted(typical[[0, 3]], key=lambda i: -value[i]) + tied[:2]
    assert set(_rank_weight(scores, 40)[scores == 0]) == {19.5 / 40}  # the 38 zeros share ranks 1 to 38


def test_on_real_annotated_nuclei_merging_touching_ones_is_what_counts():
    """BBBC039's annotated nuclei (real fluorescence fields, CC0): the annotation itself is nearly all convex, and
    the same fields segmented as a foreground threshold would (touching nuclei merged into one object) count
    several times more: the score sees merges, not nuclei."""
    import imageio.v3 as iio
    from shared_data import shared_folder
    from skimage.measure import label

    masks = sorted((shared_folder("bbbc039") / "masks").glob("*.png"))[:5]
    truths = [label(iio.imread(path)[..., 0], background=0, connectivity=2) for path in masks]
    merged = [label(truth > 0, connectivity=1) for truth in truths]  # touching nuclei become one object
    annotated, thresholded = (sum(pool_nonconvex([nonconvex_profile(x) for x in fields]))
                              for fields in (truths, merged))
    assert sum(len(np.unique(t)) - 1 for t in truths) > sum(len(np.unique(m)) - 1 for m in merged)  # some merge
    assert thresholded >= 3 * max(annotated, 1)
