"""Scoring through the real service against the same work in-process, and a whole slide in grid mode.

``throughput`` (issue 17): a synthetic image made of tiled 2048 x 2048 synthetic cells, ``--patches`` grid
patches of 256 x 256 (stride 128, a seeded subset), scored by a real `bioadapt serve` child process (embedded
Hypha server and Ray) through the Python client, with 1 and then 2 model actors, against the adapter in this
process with one torch thread on ``--local-patches`` of the same patches (evenly spread):

- in-process "mc+acq": read the patch, ``mc_proba`` (T passes), the acquisition map and the patch score;
- in-process "worker": what a service actor computes per patch (mc+acq plus the model's segmentation), no writes;
- service: the job's scoring rate (its ``patches_per_second``: shards in flight, Zarr writes of predictions and
  uncertainty, database commits, progress) and end to end (call to job done, patch drawing and selection included).
  The model actors are warm (a first job of 200 patches started them), as for every job but a project's first.

The per-patch service overhead is (1-actor service seconds per patch) / (in-process worker seconds per patch) - 1.
The service process's peak RSS is sampled (psutil, every 0.1 s) during a 200-patch job and a ``--patches`` job.

``slide`` (issue 17): a ``--slide`` x ``--slide`` uint16 slide (cells tiled inside a smooth tissue region,
background 0 elsewhere, 512 x 512 chunks, a pyramid down to ~512 px) scored with ``mode="grid"`` inside its
'auto' mask (foreground of the coarsest level): wall time, patches/s, and the uncertainty overview written
(multiscale OME-Zarr levels, the fraction of the slide scored).

Targets (issue 17): service with 2 actors >= 1.5x in-process 1 thread; per-patch overhead < 10% of the patch's
compute; service RSS at 2,000 patches < 1.2x its RSS at 200.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
UNET = dict(in_channels=1, out_channels=2, dims=2, depth=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["throughput", "slide", "all"], nargs="?", default="all")
    parser.add_argument("--patches", type=int, default=2000, help="patches of the throughput part")
    parser.add_argument("--local-patches", type=int, default=300,
                        help="patches (evenly spread over the service's) timed in-process: a per-patch rate needs "
                        "no more, and the in-process runs would otherwise take longer than both service jobs")
    parser.add_argument("--passes", type=int, default=8, help="MC-dropout passes T")
    parser.add_argument("--features", type=int, default=8, help="U-Net width (first level's channels)")
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--slide", type=int, default=20_000, help="side of the slide in pixels")
    parser.add_argument("--tissue", type=float, default=0.25, help="share of the slide covered by tissue")
    parser.add_argument("--strategy", default="bald", help="the service's scoring strategy (bald: what the in-process "
                        "reference computes; the default typical_bald also computes each patch's features)")
    parser.add_argument("--workdir", help="keep the files here (default: a temporary folder)")
    return parser.parse_args(argv)


def build_model(out: Path, features: int) -> Path:
    import torch

    from bioadapt.adapters.unet import UNet
    from bioadapt.exporters.fresh import package_new_model

    torch.manual_seed(0)
    kwargs = {**UNET, "features": features}
    return package_new_model(UNet(**kwargs).eval(), out, name="benchmark U-Net", architecture_kwargs=kwargs,
                             output_names=("foreground", "boundaries"), weights=("pytorch_state_dict",))


def tiled_image(out: Path, side: int, tissue: np.ndarray | None = None) -> Path:
    """A side x side OME-Zarr of tiled 2048 x 2048 synthetic cells, written chunk by chunk (never whole in
    memory); with ``tissue`` (a coarse bool map) only chunks inside it hold cells."""
    from bioadapt.data.synthetic import synthetic_cells
    from bioadapt.data.writer import build_pyramid, create_multiscale

    tile = synthetic_cells((2048, 2048), "crowded", seed=0).image[0].astype(np.uint16)
    chunk = 512
    _, arrays = create_multiscale(out, axes="cyx", shape=(1, side, side), dtype="uint16", chunks=(1, chunk, chunk))
    for y in range(0, side, chunk):
        for x in range(0, side, chunk):
            h, w = min(chunk, side - y), min(chunk, side - x)
            if tissue is not None:
                cells = tissue[y * tissue.shape[0] // side, x * tissue.shape[1] // side]
                if not cells:
                    continue
            ty, tx = y % 2048, x % 2048
            arrays[0][0, y:y + h, x:x + w] = tile[ty:ty + h, tx:tx + w]
    build_pyramid(arrays, "cyx")
    return out


def tissue_map(cells: int, fraction: float, seed: int = 0) -> np.ndarray:
    from bioadapt.data.synthetic import tissue_mask

    return tissue_mask((cells, cells), np.random.default_rng(seed), fraction)


class PeakRSS:
    """The peak resident memory of a process (and nothing else), sampled every 0.1 s while in a ``with``."""

    def __init__(self, pid: int):
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def in_process_rates(model: Path, image_path: Path, windows: list, passes: int) -> dict[str, float]:
    """Patches per second in this process, one torch thread: mc+acq, and the worker's whole compute."""
    import torch

    from bioadapt.active import bald, patch_score
    from bioadapt.data import open_image
    from bioadapt.service.execution import ModelSpec, load_model

    torch.set_num_threads(1)
    adapter, _ = load_model(ModelSpec(str(model), {"device": "cpu"}))
    image = open_image(image_path)
    activation = adapter.describe().activation

    def run(segment: bool, some: list | None = None) -> float:
        started = time.perf_counter()
        for window in some or windows:
            pixels = image.read(window.origin, window.shape, dtype="float32")
            samples = adapter.mc_proba(pixels[None], passes=passes, seed=0)[:, 0]  # one round: the service's masks
            patch_score(bald(samples, activation=activation))
            if segment:
                adapter.segment(pixels[None])
        return len(some or windows) / (time.perf_counter() - started)

    run(True, windows[:4])  # warm-up
    return {"mc_acq": run(False), "worker": run(True)}


def start_service(root: Path, allow: Path):
    from bioadapt.service.client import connect
    from bioadapt.service.serve_process import ServeProcess

    service = ServeProcess(root / "service", ["--allow-path", str(allow), "--port", "0", "--num-cpus", "2",
                                              "--device", "cpu"], log_path=root / "serve.log")
    info = service.start()
    return service, connect(info["server_url"], token=info["token"], workspace=info["workspace"],
                            method_timeout=600)


def timed_job(svc, service, project_id: str, **arguments) -> dict:
    with PeakRSS(service.info["pid"]) as rss:
        started = time.perf_counter()
        job = svc.wait(svc.score(project_id, **arguments), progress=False)
        wall = time.perf_counter() - started
    assert job["state"] == "done", job
    return {"patches": job["result"]["scored"], "wall_s": round(wall, 2),
            "end_to_end_per_s": round(job["result"]["scored"] / wall, 3),
            "scoring_per_s": job["progress"]["patches_per_second"], "service_peak_rss_mb": round(rss.peak / 2**20, 1)}


def throughput(args: argparse.Namespace, root: Path) -> dict:
    from bioadapt.data import open_image, sample_patches

    side = 2 * args.patch + 128 * math.ceil(math.sqrt(args.patches))  # grid of stride 128 with room to spare
    image = tiled_image(root / "tiled.ome.zarr", side)
    model = build_model(root / "model.zip", args.features)
    shape = [args.patch, args.patch]
    grid = dict(mode="grid", patch_shape=shape, stride=[128, 128], mc_passes=args.passes, seed=0,
                strategy=args.strategy)
    windows = sample_patches(open_image(image), args.patches, shape, mode="grid", stride=(128, 128), seed=0)
    print(f"throughput: {len(windows)} patches of {shape} from a {side} x {side} image, T = {args.passes}, "
          f"U-Net features {args.features}")
    timed = windows[::max(1, len(windows) // args.local_patches)][:args.local_patches]
    local = in_process_rates(model, image, timed, args.passes)
    print(f"  in-process (1 thread, {len(timed)} of the patches): mc+acq {local['mc_acq']:.2f} patches/s, "
          f"worker compute {local['worker']:.2f}")
    service, svc = start_service(root, root)
    try:
        project = svc.create_project("throughput", str(model), [{"uri": str(image)}])["id"]
        small = timed_job(svc, service, project, n_patches=200, actors=2, **grid)  # starts the 2 actors
        print(f"  service, 200 patches (first job, actors start): {small}")
        runs = {}
        for actors in (1, 2):
            runs[actors] = timed_job(svc, service, project, n_patches=args.patches, actors=actors, **grid)
            print(f"  service, {actors} actor(s): {runs[actors]}")
    finally:
        svc.disconnect()
        service.stop(timeout_s=60)
    overhead = local["worker"] / runs[1]["scoring_per_s"] - 1
    return {
        "patches": len(windows), "patch": shape, "passes": args.passes, "unet_features": args.features,
        "strategy": args.strategy,
        "in_process_1_thread_per_s": {k: round(v, 3) for k, v in local.items()},
        "in_process_patches": len(timed),
        "service": {"200_patches_first_job": small, "1_actor": runs[1], "2_actors": runs[2]},
        "two_actors_over_in_process_mc_acq": round(runs[2]["scoring_per_s"] / local["mc_acq"], 2),
        "two_actors_end_to_end_over_in_process_mc_acq": round(runs[2]["end_to_end_per_s"] / local["mc_acq"], 2),
        "per_patch_overhead_percent": round(100 * overhead, 1),
        "rss_ratio_2000_over_200": round(max(runs[1]["service_peak_rss_mb"], runs[2]["service_peak_rss_mb"])
                                         / small["service_peak_rss_mb"], 3),
    }


def slide(args: argparse.Namespace, root: Path) -> dict:
    from bioadapt.data import UncertaintyStore, open_image

    started = time.perf_counter()
    tissue = tissue_map(64, args.tissue)
    image = tiled_image(root / "slide.ome.zarr", args.slide, tissue)
    written_s = time.perf_counter() - started
    model = root / "model.zip" if (root / "model.zip").exists() else build_model(root / "model.zip", args.features)
    print(f"slide: {args.slide} x {args.slide} written in {written_s:.0f} s ({len(open_image(image).levels)} levels)")
    service, svc = start_service(root, root)
    try:
        project = svc.create_project("slide", str(model), [{"uri": str(image), "mask": "auto"}])
        row = project["images"][0]
        run = timed_job(svc, service, project["id"], mode="grid", patch_shape=[args.patch, args.patch],
                        mc_passes=args.passes, select=64, strategy=args.strategy)
        print(f"  grid inside the tissue: {run}")
        overview = svc.get_overview(project["id"], row["id"])
    finally:
        svc.disconnect()
        service.stop(timeout_s=60)
    # the service sends no paths; this script started it and knows its data folder
    store = UncertaintyStore.open(service.data_dir.resolve() / "projects" / project["id"] / "images" / row["id"]
                                  / "uncertainty.ome.zarr")
    return {
        "slide": [args.slide, args.slide], "patch": [args.patch, args.patch], "passes": args.passes,
        "strategy": args.strategy,
        "unet_features": args.features, "tissue_share_asked": args.tissue, "slide_written_s": round(written_s, 1),
        **run, "tiles_total": (args.slide // args.patch) ** 2,
        "overview": {"levels": [list(store.level_shape(i)) for i in range(store.n_levels)],
                     "returned_shape": list(overview["uncertainty"].shape),
                     "returned_factors": overview["uncertainty_factors"],
                     "scored_fraction": round(overview["scored_fraction"], 4)},
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bioadapt-bench-") as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        common = {"cpus": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                  "date": time.strftime("%Y-%m-%d %H:%M")}
        if args.part in ("throughput", "all"):
            results["throughput"] = {**throughput(args, root), **common}
            (RESULTS / "service_scoring.json").write_text(json.dumps(results["throughput"], indent=2) + "\n")
        if args.part in ("slide", "all"):
            results["slide"] = {**slide(args, root), **common,
                                "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
            (RESULTS / "slide_grid.json").write_text(json.dumps(results["slide"], indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
