"""A 100,000 x 100,000 uint16 OME-Zarr whose chunks exist only where there is tissue: sampling 100 patches
inside the tissue mask and reading them must stay under 1 GiB of peak memory (measured, in a fresh process)."""

import json
import math
import subprocess
import sys
import textwrap

import numpy as np

from bioadapt.data.ngff import register_label
from bioadapt.data.writer import create_multiscale

SIDE = 100_000
CHUNK = 1024
DISC_RADIUS = 1500
DISC_CENTRES = [(12_000, 15_000), (30_000, 80_000), (50_000, 50_000), (71_000, 22_000), (88_000, 90_000)]
ONE_GIB_KB = 1024 * 1024


def _disc_window(center, radius, origin, shape, factor):
    """Inside-disc mask for a window of a level downsampled by ``factor``."""
    ys = (np.arange(origin[0], origin[0] + shape[0]) + 0.5) * factor
    xs = (np.arange(origin[1], origin[1] + shape[1]) + 0.5) * factor
    return (ys[:, None] - center[0]) ** 2 + (xs[None, :] - center[1]) ** 2 < radius**2


def _write_sparse(array, factor, fill):
    """Write only the chunks of ``array`` (a level downsampled by ``factor``) that meet a disc."""
    chunk_y, chunk_x = array.chunks
    written = 0
    for center in DISC_CENTRES:
        low = [max(0, int((c - DISC_RADIUS) / factor)) for c in center]
        high = [min(s, int(math.ceil((c + DISC_RADIUS) / factor))) for c, s in zip(center, array.shape)]
        for cy in range(low[0] // chunk_y, (high[0] - 1) // chunk_y + 1):
            for cx in range(low[1] // chunk_x, (high[1] - 1) // chunk_x + 1):
                origin = (cy * chunk_y, cx * chunk_x)
                shape = (min(chunk_y, array.shape[0] - origin[0]), min(chunk_x, array.shape[1] - origin[1]))
                inside = _disc_window(center, DISC_RADIUS, origin, shape, factor)
                if inside.any():
                    window = tuple(slice(o, o + s) for o, s in zip(origin, shape))
                    array[window] = np.where(inside, fill(shape), array[window])
                    written += 1
    return written


def _make_slide(path):
    rng = np.random.default_rng(0)
    group, (level0,) = create_multiscale(path, axes="yx", shape=(SIDE, SIDE), dtype="uint16",
                                         chunks=(CHUNK, CHUNK), n_levels=1, version="0.5")
    _write_sparse(level0, 1, lambda shape: rng.integers(1000, 3000, size=shape, dtype=np.uint16))
    labels = group.require_group("labels")
    tissue = labels.create_group("tissue")
    _, levels = create_multiscale(None, axes="yx", shape=(SIDE, SIDE), dtype="uint8", chunks=(CHUNK, CHUNK),
                                  n_levels=7, version="0.5", group=tissue)
    for k, array in enumerate(levels):
        _write_sparse(array, 2**k, lambda shape: np.ones(shape, dtype=np.uint8))
    register_label(labels, "tissue", version="0.5", source_image="../../")


MEASURE = textwrap.dedent("""
    import json, resource, sys, tracemalloc
    tracemalloc.start()
    from bioadapt.data import open_image, sample_patches
    image = open_image(sys.argv[1])
    windows = sample_patches(image, 100, (256, 256), mask="tissue", seed=0, min_mask_fraction=0.9)
    sums = [int(image.read(w.origin, w.shape).astype("uint64").sum()) for w in windows]
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so this child would report the peak
    # of the pytest process that started it
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
    print(json.dumps({
        "max_rss_kb": int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "traced_peak_bytes": tracemalloc.get_traced_memory()[1],
        "windows": [w.origin for w in windows], "sums": sums,
    }))
""")


def test_sampling_and_reading_a_100k_image_stays_under_1_gib(tmp_path):
    path = tmp_path / "slide.ome.zarr"
    _make_slide(path)
    chunk_files = sum(1 for p in (path / "0" / "c").rglob("*") if p.is_file())
    assert chunk_files < 200  # the 20 GB image costs only its tissue chunks on disk

    result = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"peak RSS {report['max_rss_kb'] / 1024:.0f} MiB, traced peak {report['traced_peak_bytes'] / 2**20:.0f} MiB")
    assert report["max_rss_kb"] < ONE_GIB_KB
    assert len(report["windows"]) == 100
    for (y, x), total in zip(report["windows"], report["sums"]):
        centre = (y + 128, x + 128)
        assert min(math.dist(centre, c) for c in DISC_CENTRES) < DISC_RADIUS  # patch sits in tissue
        assert total > 0.8 * 256 * 256 * 1000  # and its pixels came from the written chunks
