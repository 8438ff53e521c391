"""Scoring and fine-tuning jobs on a real local Ray (2 CPUs, started once for the test session)."""

import time

import numpy as np
import pytest
import zarr

from bioadapt.data import LabelStore, open_image, sample_patches
from bioadapt.data.image import Image
from bioadapt.data.synthetic import write_synthetic_ome_zarr
from bioadapt.data.writer import write_ome_zarr
from bioadapt.service.execution import (FineTuneRequest, ImageRef, LabelledRegion, ModelWorker, ScoreRequest,
                                        create_uncertainty_store)
from bioadapt.service.jobs import JobStore, fine_tune_job, score_job
from model_factory import unet_package

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("execution")
    write_synthetic_ome_zarr(root / "image.ome.zarr", (1024, 1024), "crowded", seed=0)
    image = open_image(root / "image.ome.zarr")
    windows = sample_patches(image, 200, (64, 64), mode="grid")
    model = unet_package(root / "model.zip", features=4, weights=("pytorch_state_dict",))
    return root, image, [(i, w.origin) for i, w in enumerate(windows)], model


def _request(root, image, name, **kwargs):
    predictions = LabelStore.create(root / f"{name}-predictions.ome.zarr", like=image).path
    uncertainty = create_uncertainty_store(root / f"{name}-uncertainty.zarr", image)
    return ScoreRequest(image=ImageRef(str(root / "image.ome.zarr")), patch_shape=(64, 64), passes=4,
                        predictions=str(predictions), uncertainty=uncertainty, **kwargs)


def test_200_patches_on_two_actors_equal_the_in_process_scores(ray_cluster, setup, monkeypatch, tmp_path):
    root, image, patches, model = setup
    assert len(patches) == 200
    request = _request(root, image, "ray")

    def no_pixels_here(*args, **kwargs):
        raise AssertionError("the driver read pixel data")

    monkeypatch.setattr(Image, "read", no_pixels_here)  # actors run in other processes, unaffected
    runner = score_job(JobStore(tmp_path / "jobs.sqlite"), str(model), {"device": "cpu"}, request, patches,
                       actors=2, shard_size=32)
    job = runner.wait(300)
    monkeypatch.undo()
    assert job.state == "done", job.error
    assert job.progress["done"] == job.progress["total"] == 200 and job.progress["patches_per_second"] > 0
    ranked = job.result
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    in_process = ModelWorker(str(model), {"device": "cpu"}).score(_request(root, image, "local"), patches)
    by_id = {r["patch_id"]: r["score"] for r in in_process}
    # actors run torch with one thread, this process with two: convolution sums differ in float32 rounding.
    # BALD is a difference of two entropies of ~0.7 nats, so that rounding shows up as ~1e-7 absolute
    np.testing.assert_allclose([r["score"] for r in ranked], [by_id[r["patch_id"]] for r in ranked], atol=1e-6,
                               rtol=0)
    assert len(LabelStore.open(request.predictions).regions()) == 200
    uncertainty = zarr.open_array(request.uncertainty, mode="r")[:]
    assert np.isfinite(uncertainty).sum() == 200 * 64 * 64


def test_a_killed_actor_is_restarted_and_its_shard_retried(ray_cluster, setup, tmp_path):
    root, image, patches, model = setup
    store = JobStore(tmp_path / "jobs.sqlite")
    runner = score_job(store, str(model), {"device": "cpu"}, _request(root, image, "kill"), patches[:96],
                       actors=2, shard_size=8)
    while not runner.actors or runner.job.progress.get("done", 0) < 8:
        time.sleep(0.05)
    ray.kill(runner.actors[0], no_restart=False)
    job = runner.wait(300)
    assert job.state == "done", job.error
    assert sorted(r["patch_id"] for r in job.result) == list(range(96))
    assert store.get(job.id).state == "done"


def test_cancelling_a_fine_tune_stops_it_and_keeps_the_previous_version(ray_cluster, setup, tmp_path):
    root, image, patches, model = setup
    store = LabelStore.create(tmp_path / "labels.ome.zarr", like=image)
    truth = zarr.open_group(str(root / "image.ome.zarr"), mode="r")["labels/ground_truth/0"]
    regions = []
    for _, origin in patches[:6]:
        y, x = origin
        store.write(origin, np.asarray(truth[y:y + 64, x:x + 64]), author="test")
        regions.append(LabelledRegion(ImageRef(str(root / "image.ome.zarr")), str(store.path), tuple(origin),
                                      (64, 64)))
    versions = tmp_path / "versions"
    versions.mkdir()
    (versions / "v1.pt").write_bytes(b"previous weights")
    request = FineTuneRequest(regions=tuple(regions), params={"epochs": 1000})
    runner = fine_tune_job(JobStore(tmp_path / "jobs.sqlite"), str(model), {"device": "cpu"}, request, versions)
    while runner.job.progress.get("epoch", 0) < 2:
        time.sleep(0.05)
    asked = time.perf_counter()
    runner.cancel()
    job = runner.wait(30)
    assert time.perf_counter() - asked < 5
    assert job.state == "cancelled" and job.result["version"] is None
    assert sorted(p.name for p in versions.iterdir()) == ["v1.pt"]
    assert (versions / "v1.pt").read_bytes() == b"previous weights"


def test_an_unreachable_model_fails_the_job_with_its_cause(ray_cluster, setup, tmp_path):
    root, image, patches, _ = setup
    store = JobStore(tmp_path / "jobs.sqlite")
    job = score_job(store, str(tmp_path / "missing.zip"), {}, _request(root, image, "bad"), patches[:4]).wait(120)
    assert job.state == "failed" and "cannot load model" in job.error and "does not exist" in job.error


def test_a_model_sent_as_bytes_scores_like_its_path(ray_cluster, setup, tmp_path):
    root, image, patches, model = setup
    request = ScoreRequest(image=ImageRef(str(root / "image.ome.zarr")), patch_shape=(64, 64), passes=4)
    store = JobStore(tmp_path / "jobs.sqlite")
    by_bytes = score_job(store, model.read_bytes(), {"device": "cpu"}, request, patches[:8], actors=1).wait(120)
    by_path = score_job(store, str(model), {"device": "cpu"}, request, patches[:8], actors=1).wait(120)
    assert by_bytes.state == by_path.state == "done", (by_bytes.error, by_path.error)
    assert by_bytes.result == [{**r, "seconds": b["seconds"]} for r, b in zip(by_path.result, by_bytes.result)]


def test_nan_pixels_fail_the_job_with_a_clear_cause(ray_cluster, setup, tmp_path):
    _, _, _, model = setup
    pixels = np.ones((1, 128, 128), np.float32)
    pixels[0, 70, 70] = np.nan
    write_ome_zarr(tmp_path / "nan.ome.zarr", pixels, "cyx")
    request = ScoreRequest(image=ImageRef(str(tmp_path / "nan.ome.zarr")), patch_shape=(64, 64), passes=2)
    job = score_job(JobStore(tmp_path / "jobs.sqlite"), str(model), {"device": "cpu"}, request,
                    [(0, (0, 0)), (1, (64, 64))], actors=1).wait(120)
    assert job.state == "failed" and "NaN or infinite pixels" in job.error and "[64, 64]" in job.error


def test_the_embedded_cluster_listens_on_loopback_only(ray_cluster):
    assert "node:127.0.0.1" in ray_cluster


def test_jobs_interrupted_by_a_restart_are_marked_failed(tmp_path):
    from bioadapt.service.jobs import Job

    store = JobStore(tmp_path / "jobs.sqlite")
    store.save(Job(id="a", kind="score", state="running"))
    store.save(Job(id="b", kind="score", state="done"))
    assert JobStore(tmp_path / "jobs.sqlite").mark_interrupted() == 1
    assert store.get("a").state == "failed" and "restarted" in store.get("a").error
    assert store.get("b").state == "done"


def test_a_patch_score_is_the_mean_of_its_map_inside_the_sampling_mask_and_features_come_back(tmp_path, setup):
    """DESIGN: a patch's score is the mean of its pixel map inside the sampling mask, not over the whole window."""
    _, _, _, model = setup
    write_synthetic_ome_zarr(tmp_path / "tissue.ome.zarr", (256, 256), "nuclei", seed=3, tissue_fraction=0.5)
    image = open_image(tmp_path / "tissue.ome.zarr")
    tissue = np.asarray(image.label_image("tissue").read((0, 0), (256, 256))[0]) > 0
    edges = [(y, x) for y in range(0, 256, 64) for x in range(0, 256, 64)
             if 0.2 < tissue[y:y + 64, x:x + 64].mean() < 0.8]
    assert edges
    uncertainty = create_uncertainty_store(tmp_path / "uncertainty.zarr", image)
    request = ScoreRequest(image=ImageRef(str(tmp_path / "tissue.ome.zarr")), patch_shape=(64, 64), passes=4,
                           uncertainty=uncertainty, mask="tissue", features=True)
    worker = ModelWorker(str(model), {"device": "cpu"})
    import torch

    assert torch.get_num_threads() == 1  # the worker's default: one torch thread (benchmarks/bench_threads.py)
    results = worker.score(request, list(enumerate(edges)))
    score_map = zarr.open_array(uncertainty, mode="r")[:]
    from bioadapt.data.sampling import resolve_mask

    coarse = resolve_mask(image, "tissue")
    for (y, x), result in zip(edges, results):
        window = score_map[y:y + 64, x:x + 64]
        inside = coarse.window((y, x), (64, 64))
        assert 0 < inside.sum() < inside.size
        assert result["score"] == pytest.approx(float(window[inside].mean()), rel=1e-5)
        assert result["score"] != pytest.approx(float(window.mean()), rel=1e-3)
        assert len(result["features"]) == 2 * 4  # mean and std of the U-Net's 4 last feature maps
