"""The service's tasks in one process (no Hypha): a real BioadaptService on the test session's Ray, called as the
Hypha layer calls it. Model actors are loaded once per model and weights, whole images are scored in grid mode
with their uncertainty overview, the patches to label are picked over the whole pool, protected S3 images are
scored with their credentials, and nothing the service keeps about a job or a project outlives it. Fine-tunes
take their version number before they train, and an export lists exactly what its version was trained on."""

from __future__ import annotations

import io
import time
import zipfile

import numpy as np
from scipy import ndimage
import pytest
import yaml
import zarr
from model_factory import threshold_unet, unet_package
from service_helpers import ray_cpus_free, wait_until

from bioadapt.data import UncertaintyStore, open_image, sample_patches
from bioadapt.data.synthetic import write_synthetic_ome_zarr
from bioadapt.data.uncertainty import nan_downsample
from bioadapt.errors import BioadaptError
from bioadapt.service import schemas as s
from bioadapt.service.api import BioadaptService, Caller
from bioadapt.service.tasks.fine_tune import params_of

ray = pytest.importorskip("ray")

ALICE = Caller("alice")
PATCH = [64, 64]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-inputs")
    write_synthetic_ome_zarr(root / "a.ome.zarr", (384, 384), "crowded", seed=0)
    write_synthetic_ome_zarr(root / "b.ome.zarr", (256, 256), "crowded", seed=1)
    # a slide-like image: cells only inside a tissue mask (labels/tissue), four resolution levels
    write_synthetic_ome_zarr(root / "slide.ome.zarr", (1024, 1024), "crowded", seed=2, tissue_fraction=0.4)
    model = unet_package(root / "model.zip", features=4, weights=("pytorch_state_dict",))
    return {"root": root, "model": model}


@pytest.fixture(scope="module")
def service(ray_cluster, inputs, tmp_path_factory):
    wait_until(ray_cpus_free, 60, "Ray idle before the task tests")
    service = BioadaptService(tmp_path_factory.mktemp("task-data"), allow_paths=[inputs["root"]], device="cpu",
                              actor_idle_s=30)
    yield service
    service.close()


def _run(service: BioadaptService, function: str, timeout_s: float = 300, **arguments) -> dict:
    """Start a task as the Hypha layer does (validated arguments) and wait for its job."""
    started = getattr(service, function)(ALICE, s.FUNCTIONS[function].args.model_validate(arguments))
    deadline = time.monotonic() + timeout_s
    while (job := service.jobs.get(started["job_id"])).state not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"{function} still {job.state} after {timeout_s} s"
        time.sleep(0.2)
    assert job.state == "done", job.error
    return job.to_dict()


def _project(service: BioadaptService, inputs: dict, *images: str, holdout_fraction: float = 0.25,
             **image_options) -> dict:
    model = service.load_model(ALICE, s.LoadModel(source=str(inputs["model"])))
    specs = [{"uri": str(inputs["root"] / name), **image_options} for name in images]
    return service.create_project(ALICE, s.CreateProject(name="tasks", model=model["id"], images=specs,
                                                         holdout_fraction=holdout_fraction))


def _annotate(service: BioadaptService, project: dict, count: int) -> None:
    """Label the first ``count`` pending patches (as listed: the picks first) with the image's ground truth."""
    for patch in service.list_patches(ALICE, s.ListPatches(project_id=project["id"], limit=count, status="pending")):
        row = next(i for i in project["images"] if i["id"] == patch["image_id"])
        truth = zarr.open_group(row["uri"], mode="r")["labels/ground_truth/0"]
        (y, x), (h, w) = patch["origin"], patch["shape"]
        service.submit_labels(ALICE, s.SubmitLabels(project_id=project["id"], patch_id=patch["id"],
                                                    labels=np.asarray(truth[y:y + h, x:x + w], np.uint32)))


def test_one_model_load_serves_every_image_and_task_of_a_version(service, inputs):
    """The actor that scored the first image scores the second, then evaluates and predicts: one model load."""
    before = service.pool.started
    project = _project(service, inputs, "a.ome.zarr", "b.ome.zarr")
    job = _run(service, "score", project_id=project["id"], n_patches=8, patch_shape=PATCH, mc_passes=2, actors=1)
    assert job["result"]["scored"] == 8
    scored_images = {p["image_id"] for p in service.list_patches(ALICE, s.ListPatches(project_id=project["id"]))}
    assert scored_images == {image["id"] for image in project["images"]}  # both images, one actor
    _annotate(service, project, 4)
    assert _run(service, "evaluate", project_id=project["id"])["result"]["holdout_patches"] == 1
    image = project["images"][0]
    predicted = _run(service, "predict", project_id=project["id"], image_id=image["id"], origin=[0, 0],
                     shape=[100, 100], return_array=True)
    labels = service.job_output(ALICE, s.JobOutput(job_id=predicted["id"], name="labels"))
    assert labels.shape == (100, 100)
    assert service.pool.started - before == 1, "the model was loaded more than once for one version"
    assert service.jobs.running() == []  # finished jobs are forgotten
    # a new version is another model: its actor loads once, then serves its tasks too
    tuned = _run(service, "fine_tune", project_id=project["id"], epochs=1)
    assert tuned["result"]["version"] == 1
    started = service.pool.started
    _run(service, "predict", project_id=project["id"], image_id=image["id"], origin=[0, 0], shape=[64, 64])
    _run(service, "score", project_id=project["id"], n_patches=2, patch_shape=PATCH, mc_passes=2, actors=1)
    assert service.pool.started - started == 1


class ConnectedComponents:
    """A segmenter whose answer for any window is known: the 4-connected components of the image above 0."""

    def segment(self, x):
        return np.stack([ndimage.label(image[0] > 0)[0] for image in x]).astype(np.int32)


def _same_objects(a: np.ndarray, b: np.ndarray) -> bool:
    """Two label images that split the pixels into the same objects (ids may differ)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return (np.array_equal(a > 0, b > 0) and len(pairs.T) == len(np.unique(a)) == len(np.unique(b)))


def _blobs(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Disks and bars (convex: a window sees every part of one that it cuts as one part) at random places."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape)
    image = np.zeros(shape, np.uint16)
    for _ in range(14):
        y, x, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(2, 5)
        image[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = 1
    image[10:12, 2:shape[1] - 2] = 1  # across every tile of its row
    image[3:shape[0] - 3, 30:32] = 1  # and of its column
    return image


def test_a_region_of_several_tiles_is_segmented_as_one_image(tmp_path):
    """predict_region segments tile by tile with context around each tile, and an object cut by tile borders
    (disks on borders, bars across every tile of a row or column) is one object: the tiled labels split the region
    into the objects that segmenting it whole gives, into the array and into a label store; tiles are equal parts
    (a 40-pixel axis in 16-pixel tiles: 3 of 13-14, not 16, 16, 8)."""
    from bioadapt.data import ImageRef, LabelStore, open_image
    from bioadapt.data.writer import write_ome_zarr
    from bioadapt.service.tasks.predict import _equal_cuts, predict_region

    assert _equal_cuts(40, 16) == [(0, 13), (13, 27), (27, 40)] and _equal_cuts(16, 16) == [(0, 16)]
    image = _blobs((40, 44), seed=2)
    path = write_ome_zarr(tmp_path / "image.ome.zarr", image[None], "cyx")
    whole = ConnectedComponents().segment(image[None, None].astype(np.float32))[0]
    assert len(np.unique(whole)) > 8
    labels = predict_region(ConnectedComponents(), ImageRef(str(path)), (0, 0), (40, 44), None, tile=16, context=4)
    assert _same_objects(labels, whole)
    # a region inside the image: windows reach beyond it, its labels are the whole image's objects cut to it
    part = predict_region(ConnectedComponents(), ImageRef(str(path)), (5, 3), (30, 36), None, tile=16, context=4)
    assert _same_objects(part, whole[5:35, 3:39])

    store = LabelStore.create(None, like=open_image(path))
    store.write((0, 0), np.full((40, 44), 7, np.uint32))  # an older prediction the new one replaces
    predict_region(ConnectedComponents(), ImageRef(str(path)), (0, 0), (40, 44), str(store.path), tile=16,
                   context=4)
    assert _same_objects(LabelStore.open(store.path).read((0, 0), (40, 44)).astype(np.int64), whole)


def test_a_real_field_tiled_keeps_its_annotated_nuclei_whole(tmp_path):
    """A BBBC039 field (520 x 696, another lab's annotation) through predict_region's 512-pixel tiles, 64 pixels of
    context, with a segmenter that answers the field's own annotation for any window: the tiled labels are the
    annotation's objects, nuclei on both tile borders included (the first cut of each axis crosses some)."""
    import imageio.v3 as iio
    import tifffile
    from skimage.measure import label

    from bioadapt.data import ImageRef
    from bioadapt.data.writer import write_ome_zarr
    from bioadapt.service.tasks.predict import predict_region
    from shared_data import shared_folder

    folder = shared_folder("bbbc039")
    tif = sorted((folder / "images").glob("*.tif"))[0]
    truth = label(iio.imread(folder / "masks" / f"{tif.stem}.png")[..., 0], background=0, connectivity=2)
    assert tifffile.imread(tif).shape == truth.shape == (520, 696)
    path = write_ome_zarr(tmp_path / "field.ome.zarr", ((truth > 0) * (truth % 250 + 1)).astype(np.uint16)[None],
                          "cyx")  # each nucleus its own value, so the window's segmentation is the annotation

    class AnnotationOfTheWindow:
        def segment(self, x):
            return np.stack([label(image[0], background=0, connectivity=2) for image in x]).astype(np.int32)

    crossing = {int(k) for k in np.unique(truth[259:261]) if k} | {int(k) for k in np.unique(truth[:, 347:349]) if k}
    assert crossing, "no nucleus crosses a tile border of this field"
    labels = predict_region(AnnotationOfTheWindow(), ImageRef(str(path)), (0, 0), truth.shape, None)
    assert _same_objects(labels, truth)


def test_fine_tuning_sends_only_the_parameters_the_caller_set(service, inputs):
    assert params_of(s.FineTune(project_id="p"), "cellpose") == {}
    assert params_of(s.FineTune(project_id="p", epochs=3, params={"weight_decay": 0.1}), "bioimageio") == {
        "epochs": 3, "weight_decay": 0.1}
    with pytest.raises(BioadaptError, match=r"params\.bsize"):  # a Cellpose parameter, not a bioimage.io one
        params_of(s.FineTune(project_id="p", params={"bsize": 256}), "bioimageio")
    project = _project(service, inputs, "b.ome.zarr")
    _run(service, "score", project_id=project["id"], n_patches=4, patch_shape=PATCH, mc_passes=2, actors=1)
    _annotate(service, project, 4)
    _run(service, "fine_tune", project_id=project["id"], epochs=1)
    version = service.get_project(ALICE, s.GetProject(project_id=project["id"]))["versions"][-1]
    assert version["params"] == {"epochs": 1}  # learning rate and batch size: the adapter's own defaults


def test_grid_mode_scores_every_tile_inside_the_mask_and_writes_the_overview(service, inputs):
    project = _project(service, inputs, "slide.ome.zarr", mask="tissue")
    row = project["images"][0]
    image = open_image(row["uri"])
    expected = sample_patches(image, None, PATCH, mask="tissue", mode="grid", stride=[96, 96])
    events: list[dict] = []
    started = service.score(ALICE, s.Score(project_id=project["id"], mode="grid", patch_shape=PATCH,
                                           stride=[96, 96], mc_passes=2, select=8, strategy="bald_diverse"),
                           progress=events.append)
    assert started["patches"] is None  # grid: the tiles are counted in the job
    while (job := service.jobs.get(started["job_id"])).state not in ("done", "failed", "cancelled"):
        time.sleep(0.2)
    assert job.state == "done", job.error
    assert job.result["scored"] == len(expected) > 20 and job.progress["total"] == len(expected)
    assert any(e.get("done", 0) < len(expected) for e in events)  # results streamed shard by shard
    patches = service.list_patches(ALICE, s.ListPatches(project_id=project["id"], order="id", limit=10_000))
    assert sorted(tuple(p["origin"]) for p in patches) == sorted(w.origin for w in expected)

    # the uncertainty store is a multiscale OME-Zarr image aligned with the slide
    folder = service.data_dir / "projects" / project["id"] / "images" / row["id"] / "uncertainty.ome.zarr"
    stored = open_image(folder)
    assert stored.axes == "yx" and stored.spatial_shape == image.spatial_shape and len(stored.levels) >= 2
    assert stored.levels[1].factors == (2.0, 2.0)
    uncertainty = UncertaintyStore.open(folder)
    full = uncertainty.read((0, 0), uncertainty.shape)
    scored = np.zeros(full.shape, bool)
    for window in expected:
        scored[window.slices] = True
    assert np.array_equal(np.isfinite(full), scored)  # a map under every tile, NaN elsewhere
    np.testing.assert_allclose(uncertainty.read((0, 0), uncertainty.level_shape(1), level=1),
                               nan_downsample(full, "yx"), rtol=1e-6)
    overview = service.get_overview(ALICE, s.GetOverview(project_id=project["id"], image_id=row["id"],
                                                         max_pixels=512 * 512))
    assert overview["uncertainty"].shape == (512, 512) and overview["uncertainty_factors"] == [2.0, 2.0]
    assert overview["image"].shape == (1, 512, 512) and overview["image_factors"] == [2.0, 2.0]
    assert 0 < overview["scored_fraction"] < 1

    # the 8 picked for labelling come first, in order: uncertain patches spread over the model's features
    listed = service.list_patches(ALICE, s.ListPatches(project_id=project["id"], limit=10_000))
    assert [p["selection_rank"] for p in listed[:8]] == list(range(1, 9))
    assert all(p["selection_rank"] is None for p in listed[8:])
    assert len({p["id"] for p in listed[:8]}) == 8
    assert all(len(p["features"]) == 2 * 4 for p in listed)
    # top-k over the same pool, no rescoring: the highest scores of the whole pool
    picked = service.select_patches(ALICE, s.SelectPatches(project_id=project["id"], strategy="bald",
                                                           select=8))["selected"]
    assert picked == [p["id"] for p in sorted(patches, key=lambda p: (-p["score"], p["id"]))[:8]]
    listed = service.list_patches(ALICE, s.ListPatches(project_id=project["id"], limit=8))
    assert [p["id"] for p in listed] == picked

    # scoring the grid again re-scores the same tiles: no new patches
    again = _run(service, "score", project_id=project["id"], mode="grid", patch_shape=PATCH, stride=[96, 96],
                 mc_passes=2, seed=1, strategy="bald")
    assert again["result"]["scored"] == len(expected)
    assert len(service.list_patches(ALICE, s.ListPatches(project_id=project["id"], limit=10_000))) == len(expected)


def test_scoring_computes_what_a_strategy_needs_and_picks_by_its_rule(service, inputs):
    """A strategy that picks by features (typical_bald): the workers return the model's features of each patch
    with its score, and the picks are that strategy's selection over the pool, labelled patches excluded. A call
    that names no strategy scores with bioadapt.active's DEFAULT_STRATEGY (the shape count), whose scores are
    kept apart from the per-pixel mean's."""
    from bioadapt.active import DEFAULT_STRATEGY, STRATEGIES, select
    from bioadapt.active.shapes import TYPICAL_AREA

    name = "typical_bald"
    strategy = STRATEGIES[name]
    assert strategy.needs_features  # else this test would not show that features reach the selection
    project = _project(service, inputs, "a.ome.zarr")
    job = _run(service, "score", project_id=project["id"], n_patches=12, patch_shape=PATCH, mc_passes=2, select=4,
               actors=1, strategy=name)
    assert (job["result"]["strategy"], job["result"]["selection"]) == (name, strategy.selection)
    rows = service.store.patches(project["id"], status="pending", order="id")
    assert len(rows) == 12 and all(len(row["features"]) == 2 * 4 for row in rows)  # the U-Net's 4 last maps

    def expected(k: int, labelled: list[dict]) -> list[int]:
        pending = service.store.patches(project["id"], status="pending", order="id")
        pool = pending + labelled
        picks = select(strategy.selection, k, [row["scores"].get(strategy.acquisition) or 0.0 for row in pool],
                       np.array([row["features"] for row in pool]), labelled=range(len(pending), len(pool)), seed=0)
        return [pool[i]["id"] for i in picks]

    listed = service.list_patches(ALICE, s.ListPatches(project_id=project["id"], limit=4))
    assert [p["id"] for p in listed] == expected(4, [])
    _annotate(service, project, 2)  # the first two picks
    annotated = service.store.patches(project["id"], status="annotated", order="id")
    picked = service.select_patches(ALICE, s.SelectPatches(project_id=project["id"], select=4, strategy=name))
    assert picked["strategy"] == name and picked["selected"] == expected(4, annotated)
    assert not {p["id"] for p in annotated} & set(picked["selected"])

    # a feature-reading job gives the annotated patches the scoring model's features (after fine-tuning, the
    # ones stored earlier come from another version): features blanked here come back as the model gives them
    given = {row["id"]: row["features"] for row in annotated}
    service.store.record_features(project["id"], [{"patch_id": i, "features": [0.0] * 8} for i in given])
    default = _run(service, "score", project_id=project["id"], n_patches=1, patch_shape=PATCH, mc_passes=2,
                   actors=1, rescore_pending=True)
    refreshed = {row["id"]: row["features"] for row in service.store.patches(project["id"], status="annotated")}
    assert refreshed.keys() == given.keys()
    assert all(np.allclose(refreshed[i], given[i], atol=1e-5) and np.any(given[i]) for i in given)
    assert (default["result"]["strategy"], STRATEGIES[DEFAULT_STRATEGY].reduce) == (DEFAULT_STRATEGY, "nonconvex")
    rows = service.store.patches(project["id"], status="pending", order="id")
    assert all({"bald", "bald:nonconvex", TYPICAL_AREA} <= set(row["scores"]) for row in rows[:10])


def test_load_model_sets_the_mc_scope_its_depth_and_the_dropout_kind_that_scoring_uses(service, inputs):
    """What load_model is told reaches the actors: a patch's stored score is the one the adapter gives with those
    options (partial MC over the last activation call, channel dropout) for the round's seed; the map get_patch
    gives (what napari and the page show) is the default readable map of those passes."""
    from bioadapt.active import bald, patch_score
    from bioadapt.active.maps import DEFAULT_MAP, readable_map
    from bioadapt.adapters import load_adapter

    options = {"mc_scope": "partial", "mc_depth": 1, "dropout_kind": "channel"}
    model = service.load_model(ALICE, s.LoadModel(source=str(inputs["model"]), dropout_p=0.2, **options))
    assert model["options"] == {"dropout_p": 0.2, **options} and "partial" in model["info"]["mc_scopes"]
    project = service.create_project(ALICE, s.CreateProject(
        name="scope", model=model["id"], images=[{"uri": str(inputs["root"] / "b.ome.zarr")}]))
    _run(service, "score", project_id=project["id"], n_patches=2, patch_shape=PATCH, mc_passes=3, seed=5, actors=1,
         strategy="object_bald")  # a score the MC passes make (the default's shape count reads the segmentation)
    local = load_adapter(inputs["model"], device="cpu", dropout_p=0.2, **options)
    image = open_image(inputs["root"] / "b.ome.zarr")
    for row in service.store.patches(project["id"], order="id"):
        pixels = image.read(row["origin"], row["shape"], dtype="float32")
        samples = local.mc_proba(pixels[None], passes=3, seed=5)
        score_map, labels = bald(samples[:, 0], activation="sigmoid"), local.segment(pixels[None])[0]
        expected = patch_score(score_map, reduce="object_mean", labels=labels)
        assert row["scores"]["bald:object_mean"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
        shown = service.get_patch(ALICE, s.GetPatch(project_id=project["id"], patch_id=row["id"]))["uncertainty"]
        np.testing.assert_allclose(shown, readable_map(DEFAULT_MAP, score_map, labels,
                                                       local.segment_samples(samples)[:, 0]), atol=1e-5)
    with pytest.raises(Exception, match="mc_depth"):
        s.LoadModel(source=str(inputs["model"]), mc_scope="partial", mc_depth=0)


def test_a_model_without_patch_features_defaults_to_a_strategy_that_reads_none():
    from bioadapt.service.tasks.score import strategy_of

    cellpose = {"name": "Cellpose 4 (cpsam)", "patch_features": False}
    assert strategy_of(s.Score(project_id="p"), cellpose)[0] == s.FEATURELESS_STRATEGY
    assert strategy_of(s.Score(project_id="p"), {"patch_features": True})[0] == "typical_half_nonconvex_then_typical"
    with pytest.raises(BioadaptError, match=r"'typical_bald' picks by the model's features.*Cellpose 4"):
        strategy_of(s.Score(project_id="p", strategy="typical_bald"), cellpose)
    name, strategy, key = strategy_of(s.Score(project_id="p", strategy="object_bald", acquisition="random"), cellpose)
    assert (name, strategy.acquisition, strategy.reduce, key) == ("object_bald", "random", "object_mean",
                                                                  "random:object_mean")


def test_a_protected_bucket_image_is_scored_with_its_credentials(service, inputs, protected_s3, tmp_path):
    _, options, client = protected_s3
    client.create_bucket(Bucket="slides")
    local = inputs["root"] / "b.ome.zarr"
    for path in local.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "slides", f"b.ome.zarr/{path.relative_to(local).as_posix()}")
    uri = "s3://slides/b.ome.zarr"
    model = service.load_model(ALICE, s.LoadModel(source=str(inputs["model"])))
    with pytest.raises(BioadaptError, match="s3://slides/b.ome.zarr.*Forbidden"):  # no credentials: shut
        service.create_project(ALICE, s.CreateProject(name="s3", model=model["id"], images=[
            {"uri": uri, "storage_options": {"client_kwargs": options["client_kwargs"], "anon": True}}]))
    project = service.create_project(ALICE, s.CreateProject(name="s3", model=model["id"], images=[
        {"uri": uri, "storage_options": options}]))
    assert "storage_options" not in project["images"][0]  # never shown back: they hold the secret
    job = _run(service, "score", project_id=project["id"], n_patches=4, patch_shape=PATCH, mc_passes=2, actors=1)
    assert job["result"]["scored"] == 4  # the actors opened the protected image with the project's credentials
    top = service.list_patches(ALICE, s.ListPatches(project_id=project["id"], limit=1))[0]
    patch = service.get_patch(ALICE, s.GetPatch(project_id=project["id"], patch_id=top["id"]))
    (y, x), (h, w) = top["origin"], top["shape"]
    truth_image = zarr.open_group(str(local), mode="r")["0"]
    np.testing.assert_array_equal(patch["image"][0], truth_image[0, y:y + h, x:x + w])
    assert np.isfinite(patch["uncertainty"]).all()


def test_a_deleted_project_leaves_nothing_opened_behind(service, inputs):
    project = _project(service, inputs, "b.ome.zarr")
    _run(service, "score", project_id=project["id"], n_patches=2, patch_shape=PATCH, mc_passes=2, actors=1)
    top = service.list_patches(ALICE, s.ListPatches(project_id=project["id"], limit=1))[0]
    service.get_patch(ALICE, s.GetPatch(project_id=project["id"], patch_id=top["id"]))
    assert any(key[1] == project["id"] for key in service.opened.keys())
    service.delete_project(ALICE, s.DeleteProject(project_id=project["id"]))
    assert not any(key[1] == project["id"] for key in service.opened.keys())
    assert len(service.opened) <= service.opened.capacity
    assert service.jobs.running() == []


def _started(service: BioadaptService, function: str, **arguments) -> str:
    return getattr(service, function)(ALICE, s.FUNCTIONS[function].args.model_validate(arguments))["job_id"]


def _ended(service: BioadaptService, job_id: str, timeout_s: float = 300) -> dict:
    return wait_until(lambda: (job := service.jobs.get(job_id)).state in ("done", "failed", "cancelled") and job,
                      timeout_s, f"job {job_id} ended").to_dict()


def test_concurrent_fine_tunes_get_their_own_version_before_they_train(service, inputs):
    """Two fine-tunes of one project at once: each has its number from its start (recorded with the patches it
    trains on), the numbers differ, and a cancelled one leaves its number unusable and never reused."""
    project = _project(service, inputs, "b.ome.zarr")
    pid = project["id"]
    _run(service, "score", project_id=pid, n_patches=8, patch_shape=PATCH, mc_passes=2, actors=1)
    _annotate(service, project, 6)
    train = [p["id"] for p in service.store.patches(pid, status="annotated", split="train", order="annotated")]
    assert 0 < len(train) < 6  # some were held out: they must not be trained on
    long_job = _started(service, "fine_tune", project_id=pid, epochs=1000)
    short_job = _started(service, "fine_tune", project_id=pid, epochs=1)
    numbers = {job: wait_until(lambda: service.jobs.get(job).progress.get("version"), 60,
                               f"fine-tune {job} reported its version") for job in (long_job, short_job)}
    assert sorted(numbers.values()) == [1, 2]
    assert service.jobs.get(long_job).state in ("queued", "running")
    with pytest.raises(BioadaptError, match=r"no model version 99; it has \[0\]"):
        service.context.version(project, 99)
    with pytest.raises(BioadaptError, match=f"no model version {numbers[long_job]} yet .*training"):
        service.context.version(project, numbers[long_job])  # reserved, not usable while it trains
    for job, number in numbers.items():
        row = service.store.version(pid, number)
        assert (row["job_id"], row["parent"], row["trained_on"]) == (job, 0, train)

    assert _ended(service, short_job)["result"]["version"] == numbers[short_job]
    service.cancel_job(ALICE, s.CancelJob(job_id=long_job))
    assert _ended(service, long_job, 60)["state"] == "cancelled"
    assert service.store.version(pid, numbers[long_job])["state"] == "failed"
    with pytest.raises(BioadaptError, match=f"no model version {numbers[long_job]} .*did not finish"):
        service.context.version(project, numbers[long_job])
    listed = service.get_project(ALICE, s.GetProject(project_id=pid))["versions"]
    assert [v["number"] for v in listed] == [0, numbers[short_job]]
    assert _run(service, "fine_tune", project_id=pid, epochs=1)["result"]["version"] == 3  # 1 and 2 stay taken


def _package_config(service: BioadaptService, job: dict) -> tuple[dict, str]:
    """(rdf.yaml, README.md) of an export job's package."""
    package = zipfile.ZipFile(io.BytesIO(service.job_output(ALICE, s.JobOutput(job_id=job["id"], name="package"))))
    return yaml.safe_load(package.read("rdf.yaml")), package.read("README.md").decode()


def test_an_export_lists_exactly_the_patches_its_version_was_trained_on(service, inputs):
    """Held-out patches and patches labelled after a version was trained are not its training data; the base
    model (version 0) was trained on none of the project's patches."""
    project = _project(service, inputs, "a.ome.zarr", holdout_fraction=0.5)
    pid = project["id"]
    uri = project["images"][0]["uri"]
    _run(service, "score", project_id=pid, n_patches=10, patch_shape=PATCH, mc_passes=2, actors=1)
    _annotate(service, project, 4)
    first = service.store.patches(pid, status="annotated", order="annotated")
    train = [{"image": uri, "origin": p["origin"], "shape": p["shape"]} for p in first if p["split"] == "train"]
    assert len(train) == 2  # and 2 held out
    assert _run(service, "fine_tune", project_id=pid, epochs=1)["result"]["version"] == 1
    _annotate(service, project, 2)  # labelled after version 1 was trained
    later = [p for p in service.store.patches(pid, status="annotated", split="train") if p["id"] not in
             {q["id"] for q in first}]
    assert later  # one of them trains: version 2 learns from it, version 1 did not
    assert _run(service, "fine_tune", project_id=pid, epochs=1, base_version=1)["result"]["version"] == 2

    rdf, readme = _package_config(service, _run(service, "export_model", project_id=pid, version=1,
                                                authors=["Alice"], license="CC-BY-4.0"))
    assert rdf["config"]["bioadapt"]["regions"] == train
    assert "on 2 corrected patches" in rdf["description"]
    trained_by_2 = {tuple(p["origin"]) for p in service.context.trained_patches(project, 2)}  # what exports list
    assert trained_by_2 == {tuple(r["origin"]) for r in train} | {tuple(p["origin"]) for p in later}
    rdf, readme = _package_config(service, _run(service, "export_model", project_id=pid, version=0,
                                                authors=["Alice"], license="CC-BY-4.0"))
    assert rdf["config"]["bioadapt"]["regions"] == []
    assert "fine-tuned on" not in rdf["description"] and "the base model, not fine-tuned" in rdf["description"]
    assert "not fine-tuned" in readme and "Fine-tuned with bioadapt" not in readme


def test_a_torchscript_zoo_model_is_scored_by_augmentation_and_its_scores_are_not_zero(service, inputs):
    """unet2d_nuclei_broad as the zoo ships it (TorchScript, fixed 512 x 512 with a halo of 32, no dropout layers,
    its architecture not at hand): the service scores its own test image with test-time augmentation, the passes
    disagree, so no patch is ranked on a score of zero."""
    import shutil

    from bioadapt.data.writer import write_ome_zarr
    from shared_data import shared_folder

    package = inputs["root"] / "unet2d_nuclei_broad"
    if not package.exists():
        shutil.copytree(shared_folder("zoo") / "spec" / "unet2d_nuclei_broad", package)
    write_ome_zarr(inputs["root"] / "nuclei.ome.zarr", np.load(package / "test_input.npy")[0], "cyx", overwrite=True)
    model = service.load_model(ALICE, s.LoadModel(source=str(package / "bioimageio.yaml")))
    assert (model["info"]["weights_format"], model["info"]["sample_source"]) == ("torchscript", "tta")
    project = service.create_project(ALICE, s.CreateProject(
        name="zoo", model=model["id"], images=[{"uri": str(inputs["root"] / "nuclei.ome.zarr")}]))
    job = _run(service, "score", project_id=project["id"], n_patches=3, patch_shape=[64, 64], mc_passes=4, seed=2,
               select=2)
    scores = [p["score"] for p in service.list_patches(ALICE, s.ListPatches(project_id=project["id"], limit=3))]
    assert job["result"]["scored"] == 3 and len(scores) == 3 and min(scores) > 0, (job["result"], scores)


def test_a_version_trained_on_wrong_labels_is_judged_worse_and_never_the_default(service, inputs):
    """A fine-tune on deliberately wrong labels (every training patch 'corrected' to its inverse: the background as
    one object, the cells as background) gives a version far worse on the held-out patches: the same job judges it
    worse than its parent, so scoring, predict, export and the next fine-tune keep using the parent unless the worse
    version is named; get_project's learning curve shows both scores and why."""
    from bioadapt.demo import build_base_model

    root = inputs["root"]
    if not (root / "base.zip").exists():
        build_base_model(root / "base.zip", epochs=20, seed=0)
    write_synthetic_ome_zarr(root / "synthetic-nuclei.ome.zarr", (384, 384), "nuclei", seed=3)
    model = service.load_model(ALICE, s.LoadModel(source=str(root / "base.zip")))
    project = service.create_project(ALICE, s.CreateProject(name="wrong labels", model=model["id"], images=[
        {"uri": str(root / "synthetic-nuclei.ome.zarr")}], holdout_fraction=0.34))
    pid = project["id"]
    _run(service, "score", project_id=pid, n_patches=12, patch_shape=PATCH, mc_passes=2, actors=1)
    _annotate(service, project, 9)  # the truth first: the held-out patches keep it
    train = service.store.patches(pid, status="annotated", split="train")
    truth = zarr.open_group(str(root / "synthetic-nuclei.ome.zarr"), mode="r")["labels/ground_truth/0"]
    for patch in train:
        (y, x), (h, w) = patch["origin"], patch["shape"]
        inverse = (np.asarray(truth[y:y + h, x:x + w]) == 0).astype(np.uint32)
        service.submit_labels(ALICE, s.SubmitLabels(project_id=pid, patch_id=patch["id"], labels=inverse))
    held_out = len(service.store.patches(pid, status="annotated", split="holdout"))
    assert len(train) >= 4 and held_out >= 2

    # no validation split: validated on its own wrong labels the fine-tune may keep the starting weights (when no
    # epoch's F1 there beats theirs), and then there is no worse version to judge
    tuned = _run(service, "fine_tune", project_id=pid, epochs=30, learning_rate=3e-3,
                 params={"val_fraction": 0})["result"]
    verdict = tuned["verdict"]
    assert (tuned["version"], verdict["verdict"]) == (1, "worse"), verdict
    assert verdict["parent"] > 0.5 and verdict["interval"][1] < 0 and verdict["patches"] == held_out
    assert tuned["default_version"] == 0

    answer = service.get_project(ALICE, s.GetProject(project_id=pid))
    assert answer["default_version"] == 0 and [v["number"] for v in answer["versions"]] == [0, 1]
    [row] = answer["learning_curve"]
    assert (row["version"], row["parent"], row["labels"], row["parent_labels"], row["verdict"]) == (
        1, 0, len(train), 0, "worse")
    assert row["parent_score"] == verdict["parent"] and row["score"] == verdict["version"]
    assert "worse than its parent beyond the noise" in row["reason"]

    assert _run(service, "score", project_id=pid, n_patches=2, patch_shape=PATCH, mc_passes=2)["result"][
        "version"] == 0
    image = project["images"][0]
    assert _run(service, "predict", project_id=pid, image_id=image["id"], origin=[0, 0], shape=[64, 64])[
        "result"]["version"] == 0
    assert _run(service, "predict", project_id=pid, image_id=image["id"], origin=[0, 0], shape=[64, 64],
                version=1)["result"]["version"] == 1  # still usable when named
    exported = _run(service, "export_model", project_id=pid, authors=["Alice"], license="CC-BY-4.0")
    assert exported["result"]["version"] == 0
    rdf, readme = _package_config(service, _run(service, "export_model", project_id=pid, version=1,
                                                authors=["Alice"], license="CC-BY-4.0"))
    assert "## Learning curve" in readme and f"| 1 | 0 | {len(train)} | {held_out} |" in readme
    assert readme.rstrip().count("| worse |") == 1
    assert rdf["config"]["bioadapt"]["learning_curve"][0]["verdict"] == "worse"
    assert _run(service, "fine_tune", project_id=pid, epochs=1)["result"]["parent"] == 0  # not built on v1


def test_a_shape_strategy_scores_each_patch_by_its_merged_looking_objects(service, inputs):
    """strategy="nonconvex": every scored patch keeps the profile of the model's segmentation of it (the
    prediction store): its non-convex objects per area gate; the picks are the highest counts at the pool's
    nucleus size. The model thresholds the image, so crowded cells merge as a real model's do."""
    from bioadapt.active.shapes import nonconvex_count, nonconvex_profile, pool_nonconvex
    from bioadapt.data import LabelStore

    package = unet_package(inputs["root"] / "threshold.zip", module=threshold_unet(), weights=("pytorch_state_dict",))
    model = service.load_model(ALICE, s.LoadModel(source=str(package)))
    project = service.create_project(ALICE, s.CreateProject(name="shapes", model=model["id"], images=[
        {"uri": str(inputs["root"] / "a.ome.zarr")}]))
    job = _run(service, "score", project_id=project["id"], n_patches=10, patch_shape=PATCH, mc_passes=2, select=3,
               actors=1, strategy="nonconvex")
    assert job["result"]["strategy"] == "nonconvex"
    predictions = LabelStore.open(service.store.image(project["id"], project["images"][0]["id"])["predictions"])
    rows = service.store.patches(project["id"], status="pending", order="id")
    segmented = [predictions.read(tuple(row["origin"]), tuple(row["shape"])) for row in rows]
    assert [row["scores"]["bald:nonconvex"] for row in rows] == [nonconvex_count(labels) for labels in segmented]
    assert [{k: v for k, v in row["scores"].items() if k.startswith("nonconvex:")} for row in rows] == [
        nonconvex_profile(labels) for labels in segmented]
    counts = dict(zip([row["id"] for row in rows], pool_nonconvex([nonconvex_profile(x) for x in segmented])))
    assert len(set(counts.values())) > 1  # touching cells merge under a threshold, some patches more than others
    listed = service.list_patches(ALICE, s.ListPatches(project_id=project["id"], limit=3))
    assert sorted(counts[p["id"]] for p in listed) == sorted(counts.values())[-3:]


def test_few_held_out_patches_judge_a_version_by_cross_validation_without_changing_it(service, inputs):
    """8 labels hold out 2 patches, too few for a verdict: the fine-tune job also fine-tunes the parent 3 more
    times, each leaving out a third of the training patches (and training on the held-out ones), and judges on all
    8 patches, each segmented by a fine-tune that did not train on it. The version itself is what a fine-tune
    without that check makes: the extra fine-tunes start from the parent and leave nothing behind."""
    import torch

    project = _project(service, inputs, "a.ome.zarr")
    pid = project["id"]
    _run(service, "score", project_id=pid, n_patches=10, patch_shape=PATCH, mc_passes=2, actors=1)
    _annotate(service, project, 8)
    crossed = _run(service, "fine_tune", project_id=pid, epochs=2)["result"]
    alone = _run(service, "fine_tune", project_id=pid, epochs=2, base_version=0, cross_validate=False)["result"]
    assert alone["verdict"]["verdict"] == "undecided" and alone["verdict"]["patches"] == 2

    verdict = crossed["verdict"]
    assert (verdict["judged_by"], verdict["folds"], verdict["patches"]) == ("cross-validation", 4, 8), verdict
    assert verdict["verdict"] in ("better", "same", "worse") and verdict["reason"].startswith("cross-validated (4 ")
    metrics = service.store.version(pid, crossed["version"])["metrics"]
    folds = metrics["cross_validation"]
    assert [fold["left_out"] for fold in folds["training"]] == [[0, 3], [1, 4], [2, 5]]
    assert all(fold["epochs_run"] == 2 for fold in folds["training"])
    # the held-out patches come last, segmented by the version itself and by the parent
    assert folds["version"]["per_patch"][-2:] == metrics["holdout"]["per_patch"]
    assert folds["parent"]["per_patch"][-2:] == metrics["parent_holdout"]["per_patch"]
    assert (verdict["parent"], verdict["version"]) == (folds["parent"]["f1"], folds["version"]["f1"])
    evaluated = _run(service, "evaluate", project_id=pid, versions=[0])["result"]["versions"]["0"]
    assert metrics["parent_holdout"]["per_patch"] == evaluated["per_patch"]

    weights = [torch.load(service.store.version(pid, result["version"])["path"], map_location="cpu")
               for result in (crossed, alone)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    row = next(r for r in service.get_project(ALICE, s.GetProject(project_id=pid))["learning_curve"]
               if r["version"] == crossed["version"])
    assert (row["judged_by"], row["holdout_patches"], row["score"]) == ("cross-validation", 8, verdict["version"])
    expected_default = crossed["version"] if verdict["verdict"] in ("better", "same") else 0
    assert crossed["default_version"] == expected_default

    # 2 more labels, fine-tuned from version 1: it trained on 6 of the 8 training patches, so only the 2 new ones
    # are left out and judged (beside the 2 held-out ones), one extra fine-tune each
    _annotate(service, project, 2)
    again = _run(service, "fine_tune", project_id=pid, epochs=2, base_version=crossed["version"])["result"]
    folds = service.store.version(pid, again["version"])["metrics"]["cross_validation"]
    assert [fold["left_out"] for fold in folds["training"]] == [[6], [7]]
    assert (folds["judged_training_patches"], again["verdict"]["patches"]) == ([6, 7], 4)
    # and its best epoch is chosen on them: on the 6 patches version 1 learnt, its own weights score in-sample
    assert service.store.version(pid, again["version"])["metrics"]["training"]["val_patches"] == [6, 7]
