"""Acquisition on a real annotated image: a crop of the vendored DSB 2018 fluorescence nuclei image
(benchmarks/data/dsb2018_nuclei, CC0), scored by the service's scoring worker with a small U-Net trained for a
few seconds on synthetic nuclei. The default strategy (and the former one) must prefer patches with real nuclei
over empty background, and object-level BALD must score nuclei the model gets wrong above empty windows."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from bioadapt.active import DEFAULT_STRATEGY, STRATEGIES, f1_score, select
from bioadapt.active.shapes import pool_nonconvex
from bioadapt.adapters import load_adapter
from bioadapt.data import ImageRef
from bioadapt.data.writer import write_ome_zarr
from bioadapt.service.tasks.score import ScoreRequest, score_patches
from model_factory import cell_patches, unet_package

DATA = Path(__file__).parents[1] / "benchmarks" / "data" / "dsb2018_nuclei"
PATCH = 48
CROP = (48, 256)  # a 144 x 192 crop whose 48 x 48 windows hold 0 to 3 nuclei, 3 of them none
FORMER_DEFAULT = "typical_half_object_bald_then_typical"  # object-level BALD


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Per strategy (the default and the former one) the scores the service selects by and the features, then the
    truth and the model's labels per window, for the 3 x 4 windows of a crop."""
    root = tmp_path_factory.mktemp("real")
    # full MC: this test is about the object score. With the default partial scope (depth 3) on this 4-feature
    # network, one window empty in the truth but holding two false-positive specks scored 0.025 (full: 0.004),
    # above every window with nuclei: a known limit (docs/design.md, section 8)
    model = load_adapter(unet_package(root / "unet.zip", features=4), device="cpu", threads=1, mc_scope="full")
    model.fine_tune(cell_patches("nuclei", 16, size=48, seed=3),
                    {"epochs": 12, "learning_rate": 3e-3, "batch_size": 4, "val_fraction": 0.0})
    crop = (slice(CROP[0], CROP[0] + 3 * PATCH), slice(CROP[1], CROP[1] + 4 * PATCH))
    image = tifffile.imread(DATA / "image.tif")[crop]
    truth = tifffile.imread(DATA / "labels.tif")[crop].astype(np.int64)
    path = write_ome_zarr(root / "crop.ome.zarr", image[None].astype(np.uint16), "cyx")
    origins = [(y, x) for y in range(0, 3 * PATCH, PATCH) for x in range(0, 4 * PATCH, PATCH)]
    scored = {}
    for name in (DEFAULT_STRATEGY, FORMER_DEFAULT):
        strategy = STRATEGIES[name]
        request = ScoreRequest(image=ImageRef(str(path)), patch_shape=(PATCH, PATCH), passes=16,
                               acquisition=strategy.acquisition, reduce=strategy.reduce, seed=0, features=True)
        results = score_patches(model, request, list(enumerate(origins)))
        scores = ([r["score"] for r in results] if strategy.reduce != "nonconvex" else  # as select_pending pools them
                  pool_nonconvex([r["scores"] for r in results]))
        scored[name] = (np.array(scores), np.array([r["features"] for r in results]))
    windows = [truth[y:y + PATCH, x:x + PATCH] for y, x in origins]
    predicted = [model.segment(image[None, None, y:y + PATCH, x:x + PATCH].astype(np.float32))[0]
                 for y, x in origins]
    return scored, windows, predicted


def test_patches_with_nuclei_the_model_gets_wrong_score_above_empty_ones(scored):
    by_strategy, truth, predicted = scored
    scores = by_strategy[FORMER_DEFAULT][0]
    empty = [i for i, t in enumerate(truth) if t.max() == 0]
    wrong = [i for i, (t, p) in enumerate(zip(truth, predicted)) if t.max() > 0 and f1_score(p, t) < 1]
    assert empty and wrong  # the crop has both kinds
    assert scores[wrong].mean() > scores[empty].max()


@pytest.mark.parametrize("name", [DEFAULT_STRATEGY, FORMER_DEFAULT])
def test_the_default_selection_picks_patches_with_nuclei(scored, name):
    """typical_bald (the default before these) picked an empty window among 3 here: typical windows of a sparse
    image are background. Object-level BALD scores a window by its objects, and the shape count counts objects,
    so empty windows score 0 and the typical half's highest scores hold nuclei."""
    by_strategy, truth, _ = scored
    scores, features = by_strategy[name]
    picks = select(STRATEGIES[name].selection, 3, scores, features, seed=0)
    assert len(picks) == 3 and all(truth[i].max() > 0 for i in picks)


@pytest.mark.xfail(strict=True, reason="known limit: once labels exist the default weighs scores by typicality, "
                   "and in a pool of 12 windows (a quarter of them empty) its clusters are a few windows each, so "
                   "empty background windows come back (the former default on the benchmark's pools, round by "
                   "round to 16 labels: 1-2 nearly empty picks of 16 on DSB 2018, none on BBBC039)")
def test_the_default_selection_still_picks_nuclei_once_some_windows_are_labelled(scored):
    by_strategy, truth, _ = scored
    scores, features = by_strategy[DEFAULT_STRATEGY]
    selection = STRATEGIES[DEFAULT_STRATEGY].selection
    first = select(selection, 3, scores, features, seed=0)
    later = select(selection, 3, scores, features, labelled=first[:1], seed=0)
    assert all(truth[i].max() > 0 for i in later)


def test_the_default_partial_scope_ranks_a_real_pool_as_full_mc_does(tmp_path):
    """A fixed pool of 32 windows of the DSB 2018 image, scored by mean BALD at T = 16 with the default partial
    scope and with full MC: the rankings agree (bench_partial_mc.py measured 0.91-0.99 on the benchmark pools)."""
    from scipy.stats import spearmanr

    from bioadapt.active import bald

    model = load_adapter(unet_package(tmp_path / "unet.zip", features=4), device="cpu", threads=1)
    assert model.mc_scope == "partial"
    model.fine_tune(cell_patches("nuclei", 16, size=48, seed=3),
                    {"epochs": 12, "learning_rate": 3e-3, "batch_size": 4, "val_fraction": 0.0})
    image = tifffile.imread(DATA / "image.tif").astype(np.float32)
    windows = np.stack([image[None, y:y + PATCH, x:x + PATCH]
                        for y in range(0, 4 * PATCH, PATCH) for x in range(0, 8 * PATCH, PATCH)])
    scores = {}
    for scope in ("partial", "full"):
        samples = model.mc_proba(windows, passes=16, seed=0, scope=scope)  # (T, window, C, Y, X)
        scores[scope] = [bald(samples[:, i], activation="sigmoid").mean() for i in range(len(windows))]
    assert spearmanr(scores["partial"], scores["full"]).statistic >= 0.9  # measured 0.997 (the head scope: 0.90)
