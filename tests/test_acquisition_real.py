"""Acquisition on a real annotated image: a crop of the vendored DSB 2018 fluorescence nuclei image
(benchmarks/data/dsb2018_nuclei, CC0), scored by the service's scoring worker with a small U-Net trained for a
few seconds on synthetic nuclei. The default strategy must prefer patches with real nuclei the model gets wrong
over empty background."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from bioadapt.active import DEFAULT_ACQUISITION, DEFAULT_REDUCE, DEFAULT_SELECTION, f1_score, select
from bioadapt.adapters import load_adapter
from bioadapt.data import ImageRef
from bioadapt.data.writer import write_ome_zarr
from bioadapt.service.tasks.score import ScoreRequest, score_patches
from model_factory import cell_patches, unet_package

DATA = Path(__file__).parents[1] / "benchmarks" / "data" / "dsb2018_nuclei"
PATCH = 48
CROP = (48, 256)  # a 144 x 192 crop whose 48 x 48 windows hold 0 to 3 nuclei, 3 of them none


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(scores, features, truth per window, the model's labels per window) for the 3 x 4 windows of a crop."""
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
    request = ScoreRequest(image=ImageRef(str(path)), patch_shape=(PATCH, PATCH), passes=16,
                           acquisition=DEFAULT_ACQUISITION, reduce=DEFAULT_REDUCE, seed=0, features=True)
    results = score_patches(model, request, list(enumerate(origins)))
    windows = [truth[y:y + PATCH, x:x + PATCH] for y, x in origins]
    predicted = [model.segment(image[None, None, y:y + PATCH, x:x + PATCH].astype(np.float32))[0]
                 for y, x in origins]
    return (np.array([r["score"] for r in results]), np.array([r["features"] for r in results]), windows,
            predicted)


def test_patches_with_nuclei_the_model_gets_wrong_score_above_empty_ones(scored):
    scores, _, truth, predicted = scored
    empty = [i for i, t in enumerate(truth) if t.max() == 0]
    wrong = [i for i, (t, p) in enumerate(zip(truth, predicted)) if t.max() > 0 and f1_score(p, t) < 1]
    assert empty and wrong  # the crop has both kinds
    assert scores[wrong].mean() > scores[empty].max()


def test_the_default_selection_picks_patches_with_nuclei(scored):
    """The former default (typical_bald) picked an empty window among 3 here: typical windows of a sparse image
    are background. Object-level BALD scores a window by its objects, so empty ones score ~0."""
    scores, features, truth, _ = scored
    picks = select(DEFAULT_SELECTION, 3, scores, features, seed=0)
    assert len(picks) == 3 and all(truth[i].max() > 0 for i in picks)


@pytest.mark.xfail(strict=True, reason="known limit: once labels exist the default weighs scores by typicality, "
                   "and in a pool of 12 windows (a quarter of them empty) its clusters are a few windows each, so "
                   "empty background windows come back (the benchmark's pools, round by round to 16 labels: 1-2 "
                   "nearly empty picks of 16 on DSB 2018, none on BBBC039)")
def test_the_default_selection_still_picks_nuclei_once_some_windows_are_labelled(scored):
    scores, features, truth, _ = scored
    first = select(DEFAULT_SELECTION, 3, scores, features, seed=0)
    later = select(DEFAULT_SELECTION, 3, scores, features, labelled=first[:1], seed=0)
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
