"""Segmentation metrics: hand-computed cases, then random labels against a slow per-object reference."""

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from bioadapt.active import (MatchResult, average_precision, dice, f1_score, match_instances,
                             summarize_matches)
from bioadapt.errors import BioadaptError


def squares(shape=(40, 40), boxes=((2, 2, 10), (20, 5, 10), (8, 25, 12)), ids=None, dtype=np.uint16) -> np.ndarray:
    """A label image with one square object per (y, x, side) box, ids 1.. unless given."""
    labels = np.zeros(shape, dtype=dtype)
    for number, (y, x, side) in enumerate(boxes):
        labels[y:y + side, x:x + side] = ids[number] if ids else number + 1
    return labels


def test_identical_labels_match_perfectly():
    truth = squares()
    result = match_instances(truth, truth)
    assert (result.tp, result.fp, result.fn, result.mean_iou) == (3, 0, 0, 1.0)
    assert f1_score(truth, truth) == average_precision(truth, truth) == 1.0


def test_object_ids_do_not_matter():
    truth = squares()
    relabelled = squares(ids=[907, 3, 41])
    assert f1_score(relabelled.astype(np.int32), truth, iou_threshold=0.9) == 1.0
    for huge in ([7, 2**53, 2**53 + 1], [2**64 - 1, 2**53, 2**53 + 1]):  # ids float64 cannot tell apart, >int64
        relabelled = squares(ids=huge, dtype=np.uint64)
        result = match_instances(relabelled, truth)
        assert (result.tp, result.fp, result.fn, result.mean_iou) == (3, 0, 0, 1.0)
        assert match_instances(truth, relabelled).tp == match_instances(relabelled, relabelled).tp == 3


def test_an_object_split_unevenly_gives_one_match_and_one_false_positive():
    truth = squares(boxes=[(5, 5, 10)])
    pred = np.zeros_like(truth)
    pred[5:15, 5:11] = 4  # IoU 60/100 with the true square
    pred[5:15, 11:15] = 9  # IoU 40/100
    result = match_instances(pred, truth)
    assert (result.tp, result.fp, result.fn) == (1, 1, 0)
    assert result.mean_iou == pytest.approx(0.6)
    assert f1_score(pred, truth) == pytest.approx(2 / 3)
    assert average_precision(pred, truth) == pytest.approx(1 / 2)
    assert (match_instances(pred, truth, 0.7).tp, match_instances(pred, truth, 0.7).fp,
            match_instances(pred, truth, 0.7).fn) == (0, 2, 1)


def test_exact_halves_at_threshold_one_half_match_once():
    """Both halves have IoU exactly 0.5: Cellpose and StarDist (IoU >= threshold, optimal assignment)
    match one of them, never both."""
    truth = squares(boxes=[(5, 5, 10)])
    pred = np.zeros_like(truth)
    pred[5:15, 5:10] = 1
    pred[5:15, 10:15] = 2
    for a, b, expected in [(pred, truth, (1, 1, 0)), (truth, pred, (1, 0, 1))]:
        result = match_instances(a, b)
        assert (result.tp, result.fp, result.fn) == expected
        assert result.mean_iou == 0.5


def test_shifted_square_has_the_hand_computed_iou():
    truth = squares(boxes=[(5, 5, 10)])
    pred = squares(boxes=[(5, 8, 10)])  # 3 px to the right: overlap 10 x 7 = 70, union 200 - 70 = 130
    iou = 70 / 130  # 0.538
    matched = match_instances(pred, truth, 0.5)
    assert (matched.tp, matched.fp, matched.fn) == (1, 0, 0)
    assert matched.mean_iou == pytest.approx(iou)
    missed = match_instances(pred, truth, 0.55)
    assert (missed.tp, missed.fp, missed.fn) == (0, 1, 1)
    assert np.isnan(missed.mean_iou)
    assert f1_score(pred, truth, 0.55) == 0.0


def test_empty_images():
    empty, truth = np.zeros((20, 20), dtype=np.uint8), squares((20, 20), [(2, 2, 5), (10, 10, 5)])
    both_empty = match_instances(empty, empty)
    assert (both_empty.tp, both_empty.fp, both_empty.fn) == (0, 0, 0)
    assert f1_score(empty, empty) == average_precision(empty, empty) == 1.0
    nothing_found = match_instances(empty, truth)
    assert (nothing_found.tp, nothing_found.fp, nothing_found.fn) == (0, 0, 2)
    assert f1_score(truth, empty) == average_precision(truth, empty) == 0.0


def test_3d_cubes():
    truth = np.zeros((12, 20, 20), dtype=np.int64)
    truth[1:7, 2:8, 2:8] = 5
    truth[5:11, 10:16, 10:16] = 6
    pred = np.zeros_like(truth)
    pred[2:8, 2:8, 2:8] = 1  # shifted one plane: overlap 5*36 = 180, union 2*216 - 180 = 252
    pred[0:3, 15:18, 0:3] = 2  # nowhere near a true object
    result = match_instances(pred, truth)
    assert (result.tp, result.fp, result.fn) == (1, 1, 1)
    assert result.mean_iou == pytest.approx(180 / 252)


def test_bad_input_is_explained():
    labels = squares()
    with pytest.raises(BioadaptError, match="assignment"):
        match_instances(labels, labels, iou_threshold=0.3)
    with pytest.raises(BioadaptError, match="shape"):
        match_instances(labels, labels[:-1])
    with pytest.raises(BioadaptError, match="integer"):
        match_instances(labels.astype(np.float32), labels)
    with pytest.raises(BioadaptError, match="negative"):
        dice(-labels.astype(np.int32), labels)
    with pytest.raises(BioadaptError, match="2D"):
        match_instances(labels[None, None], labels[None, None])
    with pytest.raises(BioadaptError, match="positive"):
        dice(labels, labels, classes=[0, 1])


def test_summarize_matches_pools_counts():
    first, second = MatchResult(3, 1, 0, 0.8, 0.5), MatchResult(1, 0, 2, 0.6, 0.5)
    summary = summarize_matches([first, second, MatchResult(0, 1, 1, float("nan"), 0.5)])
    assert (summary["tp"], summary["fp"], summary["fn"], summary["images"]) == (4, 2, 3, 3)
    assert summary["f1"] == pytest.approx(8 / 13)
    assert summary["ap"] == pytest.approx(4 / 9)
    assert summary["mean_iou"] == pytest.approx((3 * 0.8 + 0.6) / 4)
    with pytest.raises(BioadaptError, match="thresholds"):
        summarize_matches([first, MatchResult(1, 0, 0, 0.9, 0.75)])
    with pytest.raises(BioadaptError):
        summarize_matches([])


def test_dice_known_values():
    pred, truth = np.zeros((4, 4), dtype=bool), np.zeros((4, 4), dtype=bool)
    pred[0, :4] = True  # 4 pixels
    truth[0, 1:4] = truth[1, :3] = True  # 6 pixels, 3 shared with pred
    assert dice(pred, truth) == pytest.approx(2 * 3 / (4 + 6))
    semantic_pred = np.array([[1, 1, 2, 2], [0, 0, 2, 2]])
    semantic_truth = np.array([[1, 0, 2, 2], [0, 0, 0, 3]])
    class_1, class_2, class_3 = 2 * 1 / 3, 2 * 2 / 6, 0.0
    assert dice(semantic_pred, semantic_truth) == pytest.approx((class_1 + class_2 + class_3) / 3)
    assert dice(semantic_pred, semantic_truth, classes=[2]) == pytest.approx(class_2)
    assert dice(semantic_pred, semantic_truth, classes=[1, 7]) == pytest.approx(class_1)  # 7 is in neither
    empty = np.zeros((4, 4), dtype=np.uint8)
    assert dice(empty, empty) == 1.0
    assert dice(empty, truth) == 0.0


def slow_reference(pred: np.ndarray, truth: np.ndarray, iou_threshold: float) -> tuple[int, int, int, float]:
    """Object by object with boolean masks, then an optimal assignment (Cellpose's and StarDist's way)."""
    pred_ids = [i for i in np.unique(pred) if i]
    truth_ids = [i for i in np.unique(truth) if i]
    iou = np.zeros((len(pred_ids), len(truth_ids)))
    for row, p in enumerate(pred_ids):
        for column, t in enumerate(truth_ids):
            inside_p, inside_t = pred == p, truth == t
            iou[row, column] = (inside_p & inside_t).sum() / (inside_p | inside_t).sum()
    rows, columns = linear_sum_assignment(-(iou >= iou_threshold).astype(float) - iou / (2 * max(1, min(iou.shape))))
    matched = iou[rows, columns][iou[rows, columns] >= iou_threshold]
    tp = len(matched)
    return tp, len(pred_ids) - tp, len(truth_ids) - tp, float(matched.mean()) if tp else float("nan")


def random_labels(rng, shape, count) -> np.ndarray:
    """Overlapping random boxes painted one over another, with scattered ids."""
    labels = np.zeros(shape, dtype=np.int32)
    ids = rng.choice(10_000, size=count, replace=False) + 1
    for object_id in ids:
        corner = [rng.integers(0, size - 4) for size in shape]
        extent = [rng.integers(3, 12) for _ in shape]
        labels[tuple(slice(c, c + e) for c, e in zip(corner, extent, strict=True))] = object_id
    return labels


@pytest.mark.parametrize("shape", [(64, 64), (16, 32, 32)])
def test_random_labels_agree_with_the_slow_reference(rng, shape):
    for trial in range(6):
        truth = random_labels(rng, shape, count=25)
        pred = np.roll(truth, shift=int(rng.integers(-2, 3)), axis=-1)  # moved objects, IoUs spread around 0.5+
        pred = np.where(rng.random(shape) < 0.02, 0, pred)  # a few holes
        pred[random_labels(rng, shape, count=4) > 0] = 20_000 + trial  # a spurious object over others
        for iou_threshold in (0.5, 0.6, 0.75, 0.9):
            result = match_instances(pred, truth, iou_threshold)
            tp, fp, fn, mean_iou = slow_reference(pred, truth, iou_threshold)
            assert (result.tp, result.fp, result.fn) == (tp, fp, fn)
            np.testing.assert_allclose(result.mean_iou, mean_iou, rtol=1e-12)
