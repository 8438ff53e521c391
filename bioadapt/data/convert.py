"""Convert TIFF (and anything tifffile reads) to a multiscale OME-Zarr, streaming block by block."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tifffile
import zarr
from tqdm.auto import tqdm

from bioadapt.data.tiff import TIFF_AXES, physical_scale
from bioadapt.data.writer import (block_count, build_pyramid, copy_block, create_multiscale, iter_blocks,
                                  pyramid_block_count)
from bioadapt.errors import BioadaptError


def _map_axes(tiff_axes: str, shape: Sequence[int], source: str) -> tuple[str, list[int]]:
    """NGFF axes (canonical t c z y x order) and, for each, the source dimension it comes from.

    Singleton dimensions other than Y and X carry nothing and are dropped.
    """
    kept: list[tuple[int, str]] = []
    for dim, (letter, size) in enumerate(zip(tiff_axes, shape)):
        name = TIFF_AXES.get(letter)
        if size == 1 and name not in ("y", "x"):
            continue
        if name is None:
            raise BioadaptError(f"'{source}' has an axis '{letter}' of size {size} that OME-Zarr cannot hold; "
                                "split the file or reorder it into T, C, Z, Y, X")
        kept.append((dim, name))
    names = [name for _, name in kept]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise BioadaptError(f"'{source}' has several axes ({tiff_axes}) that map to {repeated}; "
                            "merge them before converting")
    for letter in ("y", "x"):
        if letter not in names:
            raise BioadaptError(f"'{source}' (axes {tiff_axes}) has no {letter.upper()} axis")
    kept.sort(key=lambda item: "tczyx".index(item[1]))
    return "".join(name for _, name in kept), [dim for dim, _ in kept]


def convert_to_ome_zarr(source: str | Path, target: str | Path, *, version: str = "0.5",
                        chunks: Sequence[int] | None = None, n_levels: int | None = None,
                        overwrite: bool = False, progress: bool = True) -> str:
    """Write ``source`` (a TIFF) as a multiscale OME-Zarr at ``target``; returns the target path.

    Level 0 is copied one block of chunks at a time and the pyramid is built from it, so memory stays
    bounded by a block, whatever the file size.
    """
    source = Path(source)
    if not source.exists():
        raise BioadaptError(f"'{source}' does not exist: give the path of a TIFF file")
    if Path(target).exists() and not overwrite:
        raise BioadaptError(f"'{target}' already exists: choose another output path or pass overwrite")
    try:
        tif = tifffile.TiffFile(source)
    except (tifffile.TiffFileError, OSError) as err:
        raise BioadaptError(f"'{source}' could not be read as a TIFF: {err}") from err
    with tif:
        series = tif.series[0]
        axes, kept_dims = _map_axes(series.axes, series.shape, str(source))
        kept_set = set(kept_dims)
        shape = [series.shape[d] for d in kept_dims]
        scale, units = physical_scale(tif, axes)
        source_array: Any = zarr.open(series.aszarr(level=0), mode="r")
        _, arrays = create_multiscale(target, axes=axes, shape=shape, dtype=series.dtype, chunks=chunks,
                                      n_levels=n_levels, version=version, scale=scale, units=units,
                                      name=source.name, overwrite=overwrite)
        block = copy_block(axes, arrays[0].chunks)
        total = block_count(shape, block) + pyramid_block_count(arrays, axes)
        # Source dims in their own order, and where each output axis sits among them.
        kept_in_source_order = sorted(kept_set)
        to_output = [kept_in_source_order.index(d) for d in kept_dims]
        with tqdm(total=total, desc=f"convert {source.name}", unit="block", disable=not progress) as bar:
            for out_slices in iter_blocks(shape, block):
                index = tuple(out_slices[kept_dims.index(d)] if d in kept_set else 0
                              for d in range(len(series.shape)))
                data = np.asarray(source_array[index])
                arrays[0][out_slices] = np.transpose(data, to_output)
                bar.update()
            build_pyramid(arrays, axes, on_block=bar.update)
    return str(target)
