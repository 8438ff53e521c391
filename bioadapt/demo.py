"""`bioadapt demo`: generate an image, convert it, sample patches inside a tissue mask, store labels.

What the active-learning loop needs from the data layer, end to end, on data made here. Scoring with
MC-dropout BALD, fine-tuning on Ray and export join this demo as the service lands.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import tifffile
from tqdm.auto import tqdm

from bioadapt.data import LabelStore, SamplingMask, open_image, sample_patches
from bioadapt.data.convert import convert_to_ome_zarr
from bioadapt.data.synthetic import synthetic_cells

PIXEL_SIZE_UM = 0.65


def _write_tiff(path: Path, image: np.ndarray) -> None:
    tifffile.imwrite(path, image, ome=True, tile=(512, 512), compression="zlib",
                     metadata={"axes": "CYX", "PhysicalSizeX": PIXEL_SIZE_UM, "PhysicalSizeY": PIXEL_SIZE_UM,
                               "Channel": {"Name": ["cells", "nuclei"]}})


def run_demo(workdir: str | Path = "demo-output", size: int = 3072, n_patches: int = 12, seed: int = 0,
             patch_size: int = 256) -> dict:
    """Run the demo and return its summary (also printed)."""
    started = time.perf_counter()
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    tiff_path, zarr_path = workdir / "cells.ome.tif", workdir / "cells.ome.zarr"

    print(f"1/5 generating a {size} x {size} two-channel synthetic image with instance labels ...")
    sample = synthetic_cells((size, size), "cytoplasm", seed, n_channels=2, tissue_fraction=0.45)
    _write_tiff(tiff_path, sample.image)

    print(f"2/5 converting {tiff_path.name} to a multiscale OME-Zarr (NGFF 0.5) ...")
    convert_to_ome_zarr(tiff_path, zarr_path)
    image = open_image(zarr_path)

    print("3/5 finding the tissue on the coarsest level and sampling patches inside it ...")
    mask = SamplingMask.from_image_level(image, level=-1, smooth_sigma=32)
    windows = sample_patches(image, n_patches, (patch_size, patch_size), mask=mask, seed=seed,
                             min_mask_fraction=0.6)

    print(f"4/5 reading {len(windows)} patches from the chunks they overlap ...")
    patches = [image.read(w.origin, w.shape) for w in tqdm(windows, desc="read patches", unit="patch")]

    print("5/5 storing corrected labels for those patches (the generator's ground truth stands in for the "
          "annotator) ...")
    store = LabelStore.create(None, like=image, name="corrections")
    for window in tqdm(windows, desc="write labels", unit="patch"):
        store.write(window.origin, sample.labels[window.slices].astype(np.uint32), author="demo-annotator")

    regions = store.regions()
    stored_chunks = len(store.chunk_files())
    all_chunks = math.prod(math.ceil(s / c) for s, c in zip(store.shape, store.chunks))
    summary = {
        "image": str(zarr_path), "axes": image.axes, "shape": list(image.shape), "levels": len(image.levels),
        "tissue_fraction": round(mask.covered_fraction, 3), "patches": len(windows),
        "patch_bytes_read": int(sum(p.nbytes for p in patches)), "label_store": str(store.path),
        "regions": len(regions), "label_chunks_stored": stored_chunks, "label_chunks_total": all_chunks,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print("\nSummary")
    print(f"  image        {zarr_path}  axes={image.axes} shape={image.shape} levels={len(image.levels)} "
          f"pixel={PIXEL_SIZE_UM} µm")
    print(f"  tissue mask  {100 * mask.covered_fraction:.1f}% of the image (smoothed, Otsu threshold, on level {len(image.levels) - 1})")
    print(f"  patches      {len(windows)} of {patch_size}x{patch_size}, all inside tissue, none overlapping")
    print(f"  {'origin (y, x)':>22}  {'in mask':>7}  {'cells':>5}")
    for window in windows:
        cells = len(np.unique(store.read(window.origin, window.shape))) - 1
        print(f"  {str(window.origin):>22}  {window.mask_fraction:7.2f}  {cells:5d}")
    print(f"  labels       {store.path}")
    print(f"               {len(regions)} regions logged; {stored_chunks} of {all_chunks} label chunks on disk "
          "(only what was annotated is stored)")
    print(f"  time         {summary['seconds']} s")
    print("\nNext: scoring with MC-dropout BALD, fine-tuning on Ray actors and bioimage.io export come with the "
          "bioadapt service (`bioadapt serve`); this demo will then run the full active-learning loop through it.")
    return summary
