"""Scoring throughput on Ray: 1 and 2 model actors against the in-process path, same patches, same T.

A synthetic 2048 x 2048 OME-Zarr, 128 grid patches of 128 x 128, T = 8 passes, a U-Net (features 8, depth 2),
shards of 32 patches. Two measurements:

- whole jobs: patches per second of a score job with 1 and 2 actors (actor start-up and model load included,
  as a user sees them) and of the in-process path with all cores;
- per shard: the same shards of 32 scored by one warm actor (started, model loaded, one warm-up shard) through
  ``ray.get(actor.score.remote(...))`` and in-process with the actor's thread count (Ray gives a 1-CPU actor
  one torch thread), interleaved shard by shard so both see the same machine load. The overhead is the
  median of (Ray seconds / in-process seconds - 1) over shards: what the Ray hop, serialisation and
  scheduling add to one shard.

Targets (issue 5): 2 actors >= 1.6x one actor; per-shard overhead under 10%.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bioadapt.adapters.unet import UNet
from bioadapt.data import open_image, sample_patches
from bioadapt.data.synthetic import write_synthetic_ome_zarr
from bioadapt.exporters.fresh import package_new_model
from bioadapt.data import ImageRef
from bioadapt.service.execution import ModelActor, ModelPool, ModelSpec, make_actor, start_ray
from bioadapt.service.jobs import Jobs
from bioadapt.service.tasks.score import ScoreRequest, score_patches, score_shards

RESULTS = Path(__file__).parent / "results" / "ray_scoring.json"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_ome_zarr(root / "image.ome.zarr", (2048, 2048), "crowded", seed=0)
        image = open_image(root / "image.ome.zarr")
        patches = [(i, w.origin) for i, w in enumerate(sample_patches(image, 128, (128, 128), mode="grid"))]
        kwargs = dict(in_channels=1, out_channels=2, dims=2, features=8, depth=2)
        torch.manual_seed(0)
        model = str(package_new_model(UNet(**kwargs).eval(), root / "model.zip", name="benchmark U-Net",
                                      architecture_kwargs=kwargs, weights=("pytorch_state_dict",)))
        request = ScoreRequest(image=ImageRef(str(root / "image.ome.zarr")), patch_shape=(128, 128), passes=8)
        worker = ModelActor(ModelSpec(model, {"device": "cpu"}))
        score_patches(worker.adapter, request, patches[:4])  # warm-up
        started = time.perf_counter()
        score_patches(worker.adapter, request, patches)
        in_process = len(patches) / (time.perf_counter() - started)
        resources = start_ray(num_cpus=os.cpu_count())
        jobs = Jobs(root / "jobs.sqlite")
        rates = {}
        for actors in (1, 2):
            job = jobs.start("score", lambda runner, n=actors: whole_job(runner, model, request, patches, n)).wait()
            assert job.state == "done", job.error
            rates[actors] = job.progress["patches_per_second"]
        shard_seconds = per_shard_seconds(model, request, patches, shard_size=32)
        overheads = [ray_s / local_s - 1 for ray_s, local_s in zip(shard_seconds["ray"], shard_seconds["in_process"])]
        result = {
            "patches_per_second": {"in_process": round(in_process, 3), "ray_1_actor": rates[1],
                                   "ray_2_actors": rates[2]},
            "two_over_one": round(rates[2] / rates[1], 2),
            "per_shard_overhead_percent": round(100 * statistics.median(overheads), 1),
            "per_shard_seconds": {k: [round(x, 3) for x in v] for k, v in shard_seconds.items()},
            "whole_job_1_actor_vs_in_process_percent": round(100 * (in_process / rates[1] - 1), 1),
            "note": "whole-job rates include actor start-up and model load; the in-process whole-job figure uses "
                    f"{torch.get_num_threads()} torch threads, the per-shard comparison 1 thread on both sides",
            "patches": len(patches), "patch": [128, 128], "passes": 8, "shard": 32,
            "cluster": resources, "torch_threads_in_process": torch.get_num_threads(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
    print(json.dumps(result, indent=2))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


def whole_job(runner, model: str, request: ScoreRequest, patches: list, actors: int) -> list:
    """A score job's work with fresh actors (start-up and model load included, as for a user's first job)."""
    pool = ModelPool()
    spec = ModelSpec(model, {"device": "cpu"})
    leased = pool.lease(spec, actors)
    try:
        return score_shards(runner, leased, request, patches, shard_size=32)
    finally:
        pool.release(spec, leased, healthy=False)
        pool.close()


def per_shard_seconds(model: str, request: ScoreRequest, patches: list, shard_size: int,
                      repeats: int = 2) -> dict[str, list[float]]:
    """Seconds per shard on one warm actor and in-process with one torch thread, interleaved."""
    import ray

    actor = make_actor(ModelSpec(model, {"device": "cpu"}))
    ray.get(actor.ping.remote())
    ray.get(actor.run.remote(score_patches, request, patches[:4]))  # warm-up, as in-process
    worker = ModelActor(ModelSpec(model, {"device": "cpu"}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    score_patches(worker.adapter, request, patches[:4])
    seconds: dict[str, list[float]] = {"ray": [], "in_process": []}
    try:
        for _ in range(repeats):
            for i in range(0, len(patches), shard_size):
                shard = patches[i:i + shard_size]
                started = time.perf_counter()
                ray.get(actor.run.remote(score_patches, request, shard))
                seconds["ray"].append(time.perf_counter() - started)
                started = time.perf_counter()
                score_patches(worker.adapter, request, shard)
                seconds["in_process"].append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
        ray.kill(actor)
    return seconds


if __name__ == "__main__":
    main()
