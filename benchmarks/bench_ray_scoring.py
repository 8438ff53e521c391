"""Scoring throughput on Ray: 1 and 2 model actors against the in-process path, same patches, same T.

A synthetic 2048 x 2048 OME-Zarr, 128 grid patches of 128 x 128, T = 8 passes, a U-Net (features 8, depth 2),
shards of 32 patches. Reported: patches per second of each way. The Ray figures are whole jobs, so they
include starting the actors and loading the model in them (each job makes its own actors); the in-process
figure excludes loading. So "one_actor_overhead" is an upper bound of the per-shard overhead, not the figure
itself.
Targets (issue 5): 2 actors >= 1.6x one actor; per-shard overhead under 10%. Note the thread counts: Ray gives
each 1-CPU actor one torch thread, the in-process path uses all cores.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bioadapt.adapters.unet import UNet
from bioadapt.data import open_image, sample_patches
from bioadapt.data.synthetic import write_synthetic_ome_zarr
from bioadapt.exporters.fresh import package_new_model
from bioadapt.service.execution import ImageRef, ModelWorker, ScoreRequest, start_ray
from bioadapt.service.jobs import JobStore, score_job

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
        worker = ModelWorker(model, {"device": "cpu"})
        worker.score(request, patches[:4])  # warm-up
        started = time.perf_counter()
        worker.score(request, patches)
        in_process = len(patches) / (time.perf_counter() - started)
        resources = start_ray(num_cpus=os.cpu_count())
        store = JobStore(root / "jobs.sqlite")
        rates = {}
        for actors in (1, 2):
            job = score_job(store, model, {"device": "cpu"}, request, patches, actors=actors, shard_size=32).wait()
            assert job.state == "done", job.error
            rates[actors] = job.progress["patches_per_second"]
        result = {
            "patches_per_second": {"in_process": round(in_process, 3), "ray_1_actor": rates[1],
                                   "ray_2_actors": rates[2]},
            "two_over_one": round(rates[2] / rates[1], 2),
            "one_actor_overhead_vs_in_process_percent": round(100 * (in_process / rates[1] - 1), 1),
            "note": "Ray rates are whole jobs incl. actor start-up and model load; actors use 1 torch thread each, "
                    "in-process 2",
            "patches": len(patches), "patch": [128, 128], "passes": 8, "shard": 32,
            "cluster": resources, "torch_threads_in_process": torch.get_num_threads(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
    print(json.dumps(result, indent=2))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
