"""Readable uncertainty maps (bioadapt.active.maps): what each one paints where, on label images built by hand."""

import numpy as np
import pytest

from bioadapt.active.maps import DEFAULT_MAP, MAPS, NEEDS_PASS_LABELS, object_radius, readable_map
from bioadapt.active.metrics import best_iou
from bioadapt.errors import BioadaptError


@pytest.fixture()
def two_cells():
    """A small cell (id 1), a large one (id 2) whose left edge is uncertain, and a speckled acquisition map."""
    labels = np.zeros((40, 40), np.int64)
    labels[4:12, 4:12] = 1
    labels[16:32, 16:32] = 2
    score_map = np.random.default_rng(0).random((40, 40)) * 0.05
    score_map[16:32, 15:18] = 0.6
    return labels, score_map


def test_best_iou_per_object():
    labels = np.zeros((10, 10), np.int64)
    labels[:, :4], labels[:, 6:] = 1, 3
    other = np.zeros((10, 10), np.int64)
    other[:, :2], other[:, 6:] = 5, 7
    np.testing.assert_allclose(best_iou(labels, other), [0, 0.5, 0, 1.0])
    assert best_iou(np.zeros((4, 4), np.int64), other[:4, :4]).tolist() == [0.0]


def test_pass_disagreement_marks_the_objects_the_passes_split_and_what_only_passes_see(two_cells):
    labels, score_map = two_cells
    split = np.where(labels == 2, 2 + (np.arange(40)[None, :] >= 24), labels)  # cell 2 cut in two halves
    extra = labels.copy()
    extra[34:38, 2:6] = 9  # a pass sees an object the model does not
    passes = np.stack([labels, split, split, extra])
    shown = readable_map("disagreement", score_map, labels, passes)
    assert shown[8, 8] == 0  # every pass finds cell 1 exactly
    np.testing.assert_allclose(shown[20, 20], 1 - (1 + 0.5 + 0.5 + 1) / 4, atol=1e-6)  # halves: IoU 0.5
    assert shown[35, 3] == pytest.approx(0.25) and shown[0, 39] == 0
    with pytest.raises(BioadaptError, match="needs each MC pass's instance segmentation"):
        readable_map("disagreement", score_map, labels)


def test_object_and_boundary_maps_paint_objects_with_their_mean_and_contour_mean(two_cells):
    labels, score_map = two_cells
    by_object = readable_map("object", score_map, labels)
    grown = by_object[15:33, 15:33]
    assert np.ptp(grown) == 0 and by_object[0, 39] == 0  # one value per (grown) object, nothing on background
    np.testing.assert_allclose(grown[0, 0], score_map[15:33, 15:33].mean(), rtol=1e-5)
    contour = readable_map("boundary", score_map, labels)
    assert contour[20, 20] > by_object[20, 20] > by_object[8, 8]  # the uncertain edge weighs more on its contour
    assert np.ptp(contour[4:12, 4:12]) == 0


def test_smoothing_follows_the_object_scale(two_cells):
    labels, score_map = two_cells
    assert object_radius(labels) == pytest.approx(np.sqrt(np.median([64, 256]) / np.pi))
    smoothed = readable_map("smoothed", score_map, labels)
    assert smoothed.dtype == np.float32 and smoothed.shape == labels.shape
    assert np.std(smoothed[:, :10]) < np.std(score_map[:, :10]) / 2  # speckle evened out
    np.testing.assert_allclose(smoothed.mean(), score_map.mean(), rtol=0.05)


def test_every_map_by_name_and_wrong_input_refused(two_cells):
    labels, score_map = two_cells
    assert DEFAULT_MAP in MAPS and NEEDS_PASS_LABELS <= set(MAPS)
    passes = np.stack([labels, labels])
    for name in MAPS:
        shown = readable_map(name, score_map, labels, passes)
        assert shown.shape == labels.shape and np.isfinite(shown).all() and shown.min() >= 0
    with pytest.raises(BioadaptError, match="unknown map"):
        readable_map("speckle", score_map, labels)
    with pytest.raises(BioadaptError, match="do not match"):
        readable_map("object", score_map, labels[:10])
