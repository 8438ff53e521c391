"""The Ray plumbing on a real local Ray (2 CPUs, started once for the test session): the model pool, the score
task's shards over leased actors, one call on an actor with cancel, and the job runner."""

import time

import numpy as np
import pytest
import zarr
from model_factory import unet_package
from service_helpers import ray_cpus_free, wait_until

from bioadapt.data import ImageRef, LabelledRegion, LabelStore, UncertaintyStore, open_image, sample_patches
from bioadapt.data.image import Image
from bioadapt.data.synthetic import write_synthetic_ome_zarr
from bioadapt.data.writer import write_ome_zarr
from bioadapt.errors import BioadaptError
from bioadapt.service.execution import ModelActor, ModelPool, ModelSpec, run_body
from bioadapt.service.jobs import INTERRUPTED, Job, Jobs, Lease
from bioadapt.service.tasks.fine_tune import FineTuneRequest, fine_tune_on
from bioadapt.service.tasks.score import ScoreRequest, score_patches, score_shards

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("execution")
    write_synthetic_ome_zarr(root / "image.ome.zarr", (1024, 1024), "crowded", seed=0)
    image = open_image(root / "image.ome.zarr")
    windows = sample_patches(image, 200, (64, 64), mode="grid")
    model = unet_package(root / "model.zip", features=4, weights=("pytorch_state_dict",))
    return root, image, [(i, w.origin) for i, w in enumerate(windows)], model


@pytest.fixture
def pool(ray_cluster):
    pool = ModelPool(idle_s=30)
    yield pool
    pool.close()


def _request(root, image, name, **kwargs):
    predictions = LabelStore.create(root / f"{name}-predictions.ome.zarr", like=image).path
    uncertainty = UncertaintyStore.create(root / f"{name}-uncertainty.ome.zarr", like=image).path
    return ScoreRequest(image=ImageRef(str(root / "image.ome.zarr")), patch_shape=(64, 64), passes=4,
                        predictions=str(predictions), uncertainty=str(uncertainty), **kwargs)


def _score_job(jobs, pool, spec, request, patches, actors, **kwargs):
    """A score job as the score task runs it: actors leased for the job, shards over them, actors given back."""
    def work(runner):
        leased = pool.lease(spec, actors, cancelled=runner.cancelled)
        runner.actors = leased
        try:
            return score_shards(runner, leased, request, patches, **kwargs)
        finally:
            pool.release(spec, leased)

    return jobs.start("score", work)


def test_200_patches_on_two_actors_equal_the_in_process_scores(setup, pool, monkeypatch, tmp_path):
    root, image, patches, model = setup
    assert len(patches) == 200
    request = _request(root, image, "ray")
    spec = ModelSpec(str(model), {"device": "cpu"})

    def no_pixels_here(*args, **kwargs):
        raise AssertionError("the driver read pixel data")

    monkeypatch.setattr(Image, "read", no_pixels_here)  # actors run in other processes, unaffected
    job = _score_job(Jobs(tmp_path / "jobs.sqlite"), pool, spec, request, patches, 2,
                     shard_size=32).wait(300)
    monkeypatch.undo()
    assert job.state == "done", (job.error, job.progress)
    assert job.progress["done"] == job.progress["total"] == 200 and job.progress["patches_per_second"] > 0
    ranked = job.result
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    in_process = score_patches(ModelActor(spec).adapter, _request(root, image, "local"), patches)
    by_id = {r["patch_id"]: r["score"] for r in in_process}
    # actors run torch with one thread, this process with two: convolution sums differ in float32 rounding.
    # BALD is a difference of two entropies of ~0.7 nats, so that rounding shows up as ~1e-7 absolute
    np.testing.assert_allclose([r["score"] for r in ranked], [by_id[r["patch_id"]] for r in ranked], atol=1e-6,
                               rtol=0)
    assert len(LabelStore.open(request.predictions).regions()) == 200
    uncertainty = UncertaintyStore.open(request.uncertainty)
    assert np.isfinite(uncertainty.read((0, 0), uncertainty.shape)).sum() == 200 * 64 * 64
    assert pool.idle() == 2 and pool.started == 2  # given back warm


def test_the_pool_reuses_an_actor_while_the_weights_are_the_same(setup, pool, tmp_path):
    _, _, _, model = setup
    wait_until(ray_cpus_free, 30, "the earlier tests' actors gone")  # room for two, so nothing idle is evicted
    spec = ModelSpec(str(model), {"device": "cpu"})
    weights = tmp_path / "v1.pt"
    import torch

    # before any lease: loading a model in this process can take longer than the pool's idle_s on a busy machine
    torch.save(ModelActor(spec).adapter.state_dict(), weights)
    first = pool.lease(spec)
    pid = ray.get(first[0].ping.remote())
    pool.release(spec, first)
    again = pool.lease(spec)
    assert ray.get(again[0].ping.remote()) == pid and pool.started == 1  # no second model load
    pool.release(spec, again)
    tuned = ModelSpec(str(model), {"device": "cpu"}, str(weights))
    other = pool.lease(tuned)
    assert ray.get(other[0].ping.remote()) != pid and pool.started == 2  # other weights: another actor
    assert pool.idle() == 1  # the first one stays warm: the cluster had room for both
    pool.release(tuned, other)
    # a model that needs the room the idle actors hold: the longest idle one goes at once
    third = pool.lease(ModelSpec(model.read_bytes(), {"device": "cpu"}))
    assert pool.idle() == 1 and pool.started == 3
    pool.release(ModelSpec(model.read_bytes(), {"device": "cpu"}), third, healthy=False)
    pool.idle_s = 0.5  # idle actors go after idle_s
    deadline = time.monotonic() + 10
    while pool.idle() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pool.idle() == 0


def test_a_killed_actor_is_restarted_and_its_shard_retried(setup, pool, tmp_path):
    root, image, patches, model = setup
    store = Jobs(tmp_path / "jobs.sqlite")
    runner = _score_job(store, pool, ModelSpec(str(model), {"device": "cpu"}), _request(root, image, "kill"),
                        patches[:96], 2, shard_size=8)
    while not getattr(runner, "actors", None) or runner.job.progress.get("done", 0) < 8:
        time.sleep(0.05)
    ray.kill(runner.actors[0], no_restart=False)
    job = runner.wait(300)
    assert job.state == "done", job.error
    assert sorted(r["patch_id"] for r in job.result) == list(range(96))
    assert store.get(job.id).state == "done"


def test_cancelling_a_fine_tune_stops_it_within_seconds(setup, pool, tmp_path):
    root, image, patches, model = setup
    store = LabelStore.create(tmp_path / "labels.ome.zarr", like=image)
    truth = zarr.open_group(str(root / "image.ome.zarr"), mode="r")["labels/ground_truth/0"]
    regions = []
    for _, origin in patches[:6]:
        y, x = origin
        store.write(origin, np.asarray(truth[y:y + 64, x:x + 64]), author="test")
        regions.append(LabelledRegion(ImageRef(str(root / "image.ome.zarr")), str(store.path), tuple(origin),
                                      (64, 64)))
    spec = ModelSpec(str(model), {"device": "cpu"})
    request = FineTuneRequest(regions=tuple(regions), params={"epochs": 1000})
    actor = pool.lease(spec, kind="fine_tune")[0]
    runner = Jobs(tmp_path / "jobs.sqlite").start(
        "fine_tune", lambda job: run_body(job, actor, fine_tune_on, request, what="fine-tuning")["result"])
    while runner.job.progress.get("epoch", 0) < 2:
        time.sleep(0.05)
    asked = time.perf_counter()
    runner.cancel()
    job = runner.wait(30)
    pool.release(spec, [actor], kind="fine_tune", healthy=False)
    assert time.perf_counter() - asked < 5
    assert job.state == "cancelled" and job.result["stopped"] and job.result["epochs_run"] < 1000


def test_an_unreachable_model_is_refused_with_its_cause(setup, pool, tmp_path):
    with pytest.raises(BioadaptError, match="cannot load model(.|\n)*does not exist"):
        pool.lease(ModelSpec(str(tmp_path / "missing.zip"), {}))
    assert pool.idle() == 0


def test_a_model_sent_as_bytes_scores_like_its_path(setup, pool, tmp_path):
    root, image, patches, model = setup
    request = ScoreRequest(image=ImageRef(str(root / "image.ome.zarr")), patch_shape=(64, 64), passes=4)
    jobs = Jobs(tmp_path / "jobs.sqlite")
    by_bytes = _score_job(jobs, pool, ModelSpec(model.read_bytes(), {"device": "cpu"}), request, patches[:8],
                          1).wait(120)
    by_path = _score_job(jobs, pool, ModelSpec(str(model), {"device": "cpu"}), request, patches[:8], 1).wait(120)
    assert by_bytes.state == by_path.state == "done", (by_bytes.error, by_path.error)
    assert by_bytes.result == [{**r, "seconds": b["seconds"]} for r, b in zip(by_path.result, by_bytes.result)]


def test_nan_pixels_fail_the_job_with_a_clear_cause(setup, pool, tmp_path):
    _, _, _, model = setup
    pixels = np.ones((1, 128, 128), np.float32)
    pixels[0, 70, 70] = np.nan
    write_ome_zarr(tmp_path / "nan.ome.zarr", pixels, "cyx")
    request = ScoreRequest(image=ImageRef(str(tmp_path / "nan.ome.zarr")), patch_shape=(64, 64), passes=2)
    job = _score_job(Jobs(tmp_path / "jobs.sqlite"), pool, ModelSpec(str(model), {"device": "cpu"}),
                     request, [(0, (0, 0)), (1, (64, 64))], 1).wait(120)
    assert job.state == "failed" and "NaN or infinite pixels" in job.error and "[64, 64]" in job.error
    assert pool.idle() == 1  # the actor itself is fine: it goes back to the pool


def test_the_embedded_cluster_listens_on_loopback_only(ray_cluster):
    assert "node:127.0.0.1" in ray_cluster


def test_a_job_is_failed_once_its_replica_stops_renewing_its_lease(tmp_path):
    """A replica's heartbeat keeps its running job's lease; another replica starting leaves it alone. Once the
    heartbeat stops (the replica is gone), the next reader sees the job failed with that cause."""
    lease = Lease(lease_s=1.0, renew_s=0.2)
    first = Jobs(tmp_path / "jobs.sqlite", lease=lease)
    running = first.start("score", lambda runner: runner.cancelled.wait(60))
    first.save(Job(id="done", kind="score", state="done"))
    time.sleep(3 * lease.lease_s)  # three leases: only renewals keep it
    second = Jobs(tmp_path / "jobs.sqlite", lease=lease)  # a replica starting next to a live one
    assert second.fail_lapsed() == [] and second.get(running.job.id).state == "running"
    first.close()  # no more renewals, as when its process dies
    lapsed = wait_until(lambda: second.get(running.job.id).state == "failed", 10 * lease.lease_s,
                        "the job failed after its lease")
    job = second.get(running.job.id)
    assert lapsed and job.error == INTERRUPTED and job.finished is not None
    assert second.get("done").state == "done"
    running.cancel()
    assert running.wait(10).state == "failed"  # its own last report does not bring the record back
    second.close()


def test_finished_jobs_leave_the_runners_of_the_service(tmp_path):
    jobs = Jobs(tmp_path / "jobs.sqlite")
    slow = jobs.start("evaluate", lambda runner: runner.cancelled.wait(30) and "stopped")
    quick = jobs.start("export", lambda runner: {"path": "x"})
    assert quick.wait(10).state == "done"
    assert jobs.running() == [slow]
    assert jobs.cancel(slow.job.id) and slow.wait(10).state == "cancelled"
    assert jobs.running() == [] and not jobs.cancel(slow.job.id)
    failing = jobs.start("predict", lambda runner: 1 / 0)
    assert failing.wait(10).state == "failed" and "ZeroDivisionError" in failing.wait().error
    assert jobs.running() == []


def test_a_patch_score_is_the_mean_of_its_map_inside_the_sampling_mask_and_features_come_back(tmp_path, setup):
    """DESIGN: a patch's score is the mean of its pixel map inside the sampling mask, not over the whole window."""
    _, _, _, model = setup
    write_synthetic_ome_zarr(tmp_path / "tissue.ome.zarr", (256, 256), "nuclei", seed=3, tissue_fraction=0.5)
    image = open_image(tmp_path / "tissue.ome.zarr")
    tissue = np.asarray(image.label_image("tissue").read((0, 0), (256, 256))[0]) > 0
    edges = [(y, x) for y in range(0, 256, 64) for x in range(0, 256, 64)
             if 0.2 < tissue[y:y + 64, x:x + 64].mean() < 0.8]
    assert edges
    uncertainty = UncertaintyStore.create(tmp_path / "uncertainty.ome.zarr", like=image)
    request = ScoreRequest(image=ImageRef(str(tmp_path / "tissue.ome.zarr")), patch_shape=(64, 64), passes=4,
                           uncertainty=str(uncertainty.path), mask="tissue", features=True)
    worker = ModelActor(ModelSpec(str(model), {"device": "cpu"}))
    import torch

    assert torch.get_num_threads() == 1  # the worker's default: one torch thread (benchmarks/bench_threads.py)
    results = worker.run(score_patches, request, list(enumerate(edges)))
    shown = UncertaintyStore.open(uncertainty.path).read((0, 0), (256, 256))  # the readable map, for people
    from bioadapt.active import bald
    from bioadapt.adapters import load_adapter
    from bioadapt.data.sampling import resolve_mask

    local = load_adapter(model, device="cpu", threads=1)
    coarse = resolve_mask(image, "tissue")
    for (y, x), result in zip(edges, results):
        assert np.isfinite(shown[y:y + 64, x:x + 64]).all()
        samples = local.mc_proba(image.read((y, x), (64, 64), dtype="float32")[None], passes=4, seed=request.seed)
        window = bald(samples[:, 0], activation=local.describe().activation)  # the acquisition map scored
        inside = coarse.window((y, x), (64, 64))
        assert 0 < inside.sum() < inside.size
        assert result["score"] == pytest.approx(float(window[inside].mean()), rel=1e-5)
        assert result["score"] != pytest.approx(float(window.mean()), rel=1e-3)
        assert len(result["features"]) == 2 * 4  # mean and std of the U-Net's 4 last feature maps


def test_a_killed_model_actor_leaves_a_folder_that_the_next_sweep_removes(setup, ray_cluster):
    from pathlib import Path

    import psutil

    from bioadapt.service.execution import make_actor
    from bioadapt.service.worker_files import PREFIX, remove_orphans

    spec = ModelSpec(str(setup[3]), {"device": "cpu"})
    actor = make_actor(spec)
    folder = Path(ray.get(actor.temporary_folder.remote(), timeout=120))
    pid = ray.get(actor.ping.remote())
    assert folder.name.startswith(f"{PREFIX}{pid}-")
    assert list(folder.rglob("*.py")), "bioimageio.core imported the architecture from a file in the actor's folder"
    ray.kill(actor)  # ends the process: no cleanup of its own runs
    try:
        psutil.Process(pid).wait(timeout=30)
    except psutil.NoSuchProcess:
        pass
    assert folder.exists()
    assert remove_orphans(folder.parent) >= 1
    assert not folder.exists()
