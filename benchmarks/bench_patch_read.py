"""Patch reads per second through Image.read versus zarr directly, on the same chunks, in one run.

Writes a local OME-Zarr (NGFF 0.5, synthetic cells, 512 x 512 chunks), draws random 256 x 256 windows,
reads them with ``bioadapt.data.Image.read`` and with plain zarr slicing of the level-0 array,
alternating the two over several rounds, and reports the best round of each.
Target (issue 2): Image.read at least 0.8x the direct zarr figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from bioadapt.data import open_image, sample_patches, write_ome_zarr
from bioadapt.data.synthetic import synthetic_cells

RESULTS = Path(__file__).parent / "results" / "patch_read.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--side", type=int, default=8192, help="image side in pixels")
    parser.add_argument("--patches", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tile = synthetic_cells((2048, 2048), "crowded", seed=0).image  # (1, 2048, 2048) uint16
        reps = -(-args.side // 2048)
        data = np.tile(tile, (1, reps, reps))[:, : args.side, : args.side]
        path = write_ome_zarr(Path(tmp) / "bench.ome.zarr", data, "cyx", chunks=(1, 512, 512))
        image = open_image(path)
        direct = zarr.open_array(store=os.path.join(path, "0"), mode="r")
        windows = [w.origin for w in sample_patches(image, args.patches, (256, 256), seed=0)]
        patch_bytes = 256 * 256 * data.dtype.itemsize

        def via_image() -> None:
            for y, x in windows:
                image.read((y, x), (256, 256))

        def via_zarr() -> None:
            for y, x in windows:
                direct[0:1, y:y + 256, x:x + 256]

        np.testing.assert_array_equal(image.read(windows[0], (256, 256)),
                                      direct[0:1, windows[0][0]:windows[0][0] + 256, windows[0][1]:windows[0][1] + 256])
        timings: dict[str, list[float]] = {"image_read": [], "zarr_direct": []}
        for _ in range(args.rounds):
            for name, run in (("zarr_direct", via_zarr), ("image_read", via_image)):
                started = time.perf_counter()
                run()
                timings[name].append(time.perf_counter() - started)

    figures = {}
    for name, values in timings.items():
        best = min(values)
        figures[name] = {"patches_per_s": round(len(windows) / best, 1),
                         "mb_per_s": round(len(windows) * patch_bytes / best / 1e6, 1),
                         "seconds_per_round": [round(v, 3) for v in values]}
    ratio = figures["image_read"]["patches_per_s"] / figures["zarr_direct"]["patches_per_s"]
    result = {
        "benchmark": "256x256 uint16 patch reads from a local OME-Zarr 0.5 (512x512 chunks)",
        "image_shape": list(data.shape), "patches": len(windows), "rounds": args.rounds, **figures,
        "ratio_image_read_over_zarr": round(ratio, 3), "target_ratio": 0.8,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "zarr": zarr.__version__},
    }
    print(f"{'method':<14}{'patches/s':>12}{'MB/s':>10}")
    for name in ("zarr_direct", "image_read"):
        print(f"{name:<14}{figures[name]['patches_per_s']:>12}{figures[name]['mb_per_s']:>10}")
    print(f"Image.read / zarr direct = {ratio:.3f} (target >= 0.8)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
