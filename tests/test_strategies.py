"""Selection strategies on constructed pools where the right pick is known: typical patches (TypiClust), typical and
uncertain ones, core-set, object-level patch scores, and the strategy registry the service names."""

import numpy as np
import pytest

from bioadapt.active import (DEFAULT_ACQUISITION, DEFAULT_SELECTION, DEFAULT_STRATEGY, SELECTIONS, STRATEGIES, bald,
                             object_patch_score, patch_score, select, select_coreset, select_typical, typicality)
from bioadapt.active.selection import standardised
from bioadapt.errors import BioadaptError


def _pool(seed: int = 0):
    """A large tight cluster (80 patches around (0, 0)), a small one (20 around (6, 6)) and 4 far outliers; the
    patch nearest each cluster centre is the most typical one of that cluster."""
    rng = np.random.default_rng(seed)
    big = rng.normal((0, 0), 1.0, (80, 2))
    small = rng.normal((6, 6), 0.5, (20, 2))
    outliers = np.array([[30.0, 30.0], [-30.0, 25.0], [25.0, -30.0], [-28.0, -28.0]])
    return np.concatenate([big, small, outliers])


def _nearest(features, centre, members):
    return members[np.argmin(((features[members] - centre) ** 2).sum(1))]


def test_typicality_is_highest_at_the_centre_of_a_dense_cluster_and_lowest_for_outliers():
    features = _pool()
    value = typicality(features)
    assert value[100:].max() < value[:100].min()  # every outlier is less typical than every cluster member
    assert np.argmax(value[:80]) in np.argsort(((features[:80]) ** 2).sum(1))[:10]


def test_typical_selection_takes_one_central_patch_per_cluster_and_never_an_outlier():
    features = _pool()
    assert select_typical(features, 1, seed=0)[0] < 80  # the largest cluster first
    for k in (2, 3, 4):
        assert all(i < 100 for i in select_typical(features, k, seed=0)), k  # outlier clusters are too small
    clusters_only = features[:100]
    two = select_typical(clusters_only, 2, seed=0)
    assert sorted(i < 80 for i in two) == [False, True]
    centre_of_small = features[80:100].mean(0)
    small_pick = next(i for i in two if i >= 80)
    distances = ((features[80:100] - centre_of_small) ** 2).sum(1)
    assert distances[small_pick - 80] <= np.quantile(distances, 0.3)  # central, not on the rim


def test_typical_selection_skips_clusters_that_already_hold_a_label():
    features = _pool()
    picks = select_typical(features[:100], 1, labelled=[3], seed=0)  # a label in the big cluster already
    assert 80 <= picks[0] < 100
    assert 3 not in select_typical(features, 30, labelled=[3], seed=0)


def test_typical_and_uncertain_prefers_the_uncertain_patch_among_typical_ones_but_not_an_uncertain_outlier():
    features = _pool()
    scores = np.full(len(features), 0.1)
    scores[100:] = 1.0  # outliers: the most uncertain of all
    centre = _nearest(features, (0, 0), np.arange(80))
    near = [i for i in np.argsort(((features[:80]) ** 2).sum(1))[:8] if i != centre]
    scores[near[3]] = 0.9  # a typical patch, a little off-centre, that the model is unsure of
    plain = select_typical(features, 1, seed=0)
    weighted = select_typical(features, 1, scores=scores, seed=0)
    assert weighted == [near[3]] and plain != weighted
    assert not set(select("typical_uncertain", 4, scores, features)) & {100, 101, 102, 103}
    assert select_top(scores, 4) == [100, 101, 102, 103]  # what plain top-k would have done


def test_top_then_typical_takes_the_most_uncertain_first_and_typical_uncertain_patches_once_labels_exist():
    """A tuned model's uncertainty ran to rare near-empty windows on the real image; after the first round the
    rule weighs uncertainty by typicality, so uncertain outliers wait."""
    features = _pool()
    scores = np.full(len(features), 0.1)
    scores[100:] = 1.0  # outliers: the most uncertain of all
    scores[5] = 0.9  # a patch of the large cluster that the model is unsure of
    assert select("top_then_typical", 2, scores, features) == [100, 101]  # no labels yet: plain top-k
    assert select("top_then_typical", 1, scores, features, labelled=[100, 101]) == [5]
    later = select("top_then_typical", 3, scores, features, labelled=[100, 101])
    assert 5 in later and not set(later) & {102, 103}


def test_typical_half_top_takes_the_most_uncertain_typical_patches_and_outliers_only_when_nothing_else_is_left():
    """The untuned model's most uncertain patches were the pool's outliers on the synthetic benchmark; the first
    round takes the most uncertain patches of the typical half instead, in score order."""
    features = _pool()
    scores = np.linspace(0.0, 0.5, len(features))
    scores[100:] = 1.0  # outliers: the most uncertain of all
    value = typicality(standardised(features))
    typical_half = np.flatnonzero(value >= np.median(value))
    expected = sorted(typical_half, key=lambda i: -scores[i])[:3]
    assert select("typical_half_top", 3, scores, features) == expected
    assert select("top", 3, scores, features) == [100, 101, 102]
    everything = select("typical_half_top", len(features), scores, features)
    assert set(everything[:len(typical_half)]) == set(typical_half)
    assert everything[len(typical_half):len(typical_half) + 4] == [100, 101, 102, 103]  # then the rest by score
    assert expected[0] not in select("typical_half_top", 3, scores, features, labelled=[expected[0]])


def test_typical_half_top_then_typical_switches_to_typical_uncertain_picks_once_labels_exist():
    features = _pool()
    scores = np.full(len(features), 0.1)
    scores[100:] = 1.0
    scores[5] = 0.9
    first = select("typical_half_top_then_typical", 2, scores, features)
    assert first[0] == 5 and not set(first) & {100, 101, 102, 103}
    labelled = [5]
    assert (select("typical_half_top_then_typical", 3, scores, features, labelled=labelled, seed=2) ==
            select("typical_uncertain", 3, scores, features, labelled=labelled, seed=2))


def select_top(scores, k):
    return select("top", k, scores)


def test_coreset_covers_the_pool_far_points_first():
    line = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]])
    assert select_coreset(line, 1, labelled=[0]) == [4]
    assert select_coreset(line, 2, labelled=[0]) == [4, 2]
    first = select_coreset(_pool(), 5)
    assert set(first[1:]) >= {100, 101, 102, 103} - {first[0]}  # the outliers are what is far from everything


def test_select_never_returns_labelled_patches_and_checks_its_inputs():
    features = _pool()
    scores = np.linspace(0, 1, len(features))
    for name in SELECTIONS:
        picks = select(name, 10, scores, features, labelled=[103, 102, 5], seed=1)
        assert len(picks) == len(set(picks)) == 10 and not set(picks) & {103, 102, 5}, name
    assert select("top", 200, scores, labelled=[0]) == list(range(len(features) - 1, 0, -1))
    with pytest.raises(BioadaptError, match="needs a feature vector"):
        select("typical", 2, scores)
    with pytest.raises(BioadaptError, match="unknown selection"):
        select("best", 2, scores)


def test_the_registry_names_the_default_and_every_strategy_is_complete():
    assert DEFAULT_STRATEGY in STRATEGIES
    assert STRATEGIES[DEFAULT_STRATEGY].acquisition == DEFAULT_ACQUISITION
    assert STRATEGIES[DEFAULT_STRATEGY].selection == DEFAULT_SELECTION
    for strategy in STRATEGIES.values():
        assert strategy.selection in SELECTIONS


def _samples(probability: np.ndarray, disagree: np.ndarray, passes: int = 8) -> np.ndarray:
    """(T, 1, Y, X) sigmoid samples: ``probability`` in every pass, except that half the passes flip it to
    1 - p where ``disagree`` is set."""
    samples = np.repeat(probability[None, None].astype(np.float32), passes, 0)
    samples[::2, 0][:, disagree] = 1 - samples[::2, 0][:, disagree]
    return samples


def test_object_scores_rank_one_uncertain_object_above_many_right_objects_with_uncertain_rims():
    """Mean pixel BALD prefers a crowded patch whose objects are right (only their rims are a little uncertain);
    the object-level score prefers the patch whose one object the passes disagree on."""
    from scipy import ndimage

    size = 48
    yy, xx = np.mgrid[:size, :size]
    crowded = np.zeros((size, size), np.int32)
    for i, (cy, cx) in enumerate([(y, x) for y in (8, 24, 40) for x in (8, 24, 40)], start=1):
        crowded[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = i
    rims = ndimage.grey_dilation(crowded, size=3) != ndimage.grey_erosion(crowded, size=3)
    crowded_probability = np.where(rims, 0.8, np.where(crowded > 0, 0.99, 0.01))
    crowded_map = bald(_samples(crowded_probability, rims), activation="sigmoid")
    single = np.zeros((size, size), np.int32)
    single[(yy - 24) ** 2 + (xx - 24) ** 2 <= 36] = 1
    single_map = bald(_samples(np.where(single > 0, 0.99, 0.01), single > 0), activation="sigmoid")
    assert patch_score(crowded_map) > patch_score(single_map)
    assert (patch_score(single_map, reduce="object_mean", labels=single) >
            2 * patch_score(crowded_map, reduce="object_mean", labels=crowded))
    assert object_patch_score(np.zeros((8, 8)), np.zeros((8, 8), int)) == 0.0


def test_an_uncertain_blob_the_model_found_no_object_in_still_counts():
    score_map = np.zeros((32, 32), np.float32)
    score_map[10:16, 10:16] = 0.5  # a nucleus the model missed: no label, but the passes disagree there
    assert object_patch_score(score_map, np.zeros((32, 32), int)) == pytest.approx(0.5)


def test_a_speck_where_a_few_passes_disagree_is_not_a_missed_object():
    """Missed objects are object-sized: a 2 x 2 speck of high BALD (MC noise, which moves with the round's seed)
    leaves a patch of right objects scored by those objects alone."""
    labels = np.zeros((32, 32), int)
    labels[4:12, 4:12] = 1
    score_map = np.full((32, 32), 0.01, np.float32)
    score_map[20:22, 20:22] = 0.9
    assert object_patch_score(score_map, labels) == pytest.approx(0.01, abs=1e-3)
    score_map[16:24, 16:24] = 0.9  # as large as the object beside it: a nucleus the model may have missed
    assert object_patch_score(score_map, labels) == pytest.approx((0.01 + 0.9) / 2, abs=1e-2)


def test_patch_scores_count_only_pixels_inside_the_mask():
    score_map = np.zeros((16, 16), np.float32)
    score_map[:, 8:] = 1.0  # outside the sampling mask (e.g. slide background or padding)
    mask = np.zeros((16, 16), bool)
    mask[:, :8] = True
    assert patch_score(score_map, mask) == 0.0 and patch_score(score_map) == 0.5
    labels = np.zeros((16, 16), int)
    labels[2:6, 10:14] = 1
    assert patch_score(score_map, mask, reduce="object_mean", labels=labels) == 0.0
