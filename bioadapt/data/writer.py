"""Write multiscale OME-Zarr images chunk by chunk (arrays with zarr, metadata with ome-zarr-py)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import zarr

from bioadapt.data import ngff
from bioadapt.data.stores import open_store
from bioadapt.errors import BioadaptError

DOWNSAMPLED_AXES = "yx"  # z is often anisotropic: keep it at full resolution in every level


def default_chunks(axes: str, shape: Sequence[int]) -> tuple[int, ...]:
    """Chunks that suit patch reads: one channel/time point, 512x512 in 2D, 32x256x256 in 3D."""
    is_3d = "z" in axes
    plane = 256 if is_3d else 512
    sizes = {"t": 1, "c": 1, "z": 32, "y": plane, "x": plane}
    return tuple(min(sizes[a], s) for a, s in zip(axes, shape))


def auto_level_count(axes: str, shape: Sequence[int], smallest: int = 512, most: int = 10) -> int:
    """Levels until the largest downsampled axis is at most ``smallest`` pixels."""
    largest = max(s for a, s in zip(axes, shape) if a in DOWNSAMPLED_AXES)
    return min(most, 1 + max(0, math.ceil(math.log2(max(largest, 1) / smallest))))


def level_shape(axes: str, shape: Sequence[int], level: int) -> tuple[int, ...]:
    return tuple(math.ceil(s / 2**level) if a in DOWNSAMPLED_AXES else s for a, s in zip(axes, shape))


def create_multiscale(path: str | Path, *, axes: str, shape: Sequence[int], dtype: np.dtype | str,
                      chunks: Sequence[int] | None = None, n_levels: int | None = None, version: str = "0.5",
                      scale: Sequence[float] | None = None, units: dict[str, str] | None = None,
                      name: str | None = None, group: zarr.Group | None = None,
                      overwrite: bool = False, fill_value: float = 0) -> tuple[zarr.Group, list[zarr.Array]]:
    """Create an OME-Zarr group with empty level arrays and its multiscales metadata.

    Chunks equal to ``fill_value`` are never written, so sparse images cost only what they hold.
    """
    axes = axes.lower()
    fmt = ngff.ngff_format(version)
    if group is None:
        store = open_store(path, read_only=False)
        group = zarr.open_group(store=store, mode="w" if overwrite else "w-", zarr_format=fmt.zarr_format)
    chunks = tuple(chunks) if chunks is not None else default_chunks(axes, shape)
    n_levels = n_levels or auto_level_count(axes, shape)
    scale = tuple(scale) if scale is not None else (1.0,) * len(axes)
    extra = {"dimension_names": list(axes)} if fmt.zarr_format == 3 else {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
    arrays, level_scales = [], []
    for level in range(n_levels):
        lshape = level_shape(axes, shape, level)
        arrays.append(group.create_array(
            name=str(level), shape=lshape, dtype=dtype, fill_value=fill_value,
            chunks=tuple(min(c, s) for c, s in zip(chunks, lshape)),
            config={"write_empty_chunks": False}, overwrite=overwrite, **extra))
        level_scales.append([s * 2**level if a in DOWNSAMPLED_AXES else s for a, s in zip(axes, scale)])
    ngff.write_multiscales(group, axes=axes, level_paths=[str(i) for i in range(n_levels)],
                           level_scales=level_scales, version=version, units=units, name=name)
    return group, arrays


def downsample_block(block: np.ndarray, axes: str, *, labels: bool) -> np.ndarray:
    """Halve the y and x axes: 2x2 mean for intensities, every other pixel for labels."""
    if labels:
        index = tuple(slice(None, None, 2) if a in DOWNSAMPLED_AXES else slice(None) for a in axes)
        return block[index]
    pad = [(0, s % 2) if a in DOWNSAMPLED_AXES else (0, 0) for a, s in zip(axes, block.shape)]
    if any(p[1] for p in pad):
        block = np.pad(block, pad, mode="edge")
    shape: list[int] = []
    pair_axes: list[int] = []
    for a, s in zip(axes, block.shape):
        if a in DOWNSAMPLED_AXES:
            shape.extend([s // 2, 2])
            pair_axes.append(len(shape) - 1)
        else:
            shape.append(s)
    mean = block.reshape(shape).mean(axis=tuple(pair_axes), dtype=np.float64)
    if np.issubdtype(block.dtype, np.integer):
        mean = np.rint(mean)
    return mean.astype(block.dtype)


def copy_block(axes: str, chunks: Sequence[int]) -> tuple[int, ...]:
    """The unit of streamed copies: 2 x 2 chunks in y and x, one chunk along the other axes."""
    return tuple(c * 2 if a in DOWNSAMPLED_AXES else c for a, c in zip(axes, chunks))


def iter_blocks(shape: Sequence[int], block: Sequence[int]):
    """Slices tiling ``shape`` in blocks of ``block``, in C order."""
    ranges = [range(0, s, b) for s, b in zip(shape, block)]
    for starts in itertools.product(*ranges):
        yield tuple(slice(st, min(st + b, s)) for st, b, s in zip(starts, block, shape))


def build_pyramid(arrays: list[zarr.Array], axes: str, *, labels: bool = False,
                  on_block: Callable[[], None] | None = None) -> None:
    """Fill levels 1.. from the level above, one target chunk-row block at a time."""
    for source, target in zip(arrays[:-1], arrays[1:]):
        for target_slices in iter_blocks(target.shape, copy_block(axes, target.chunks)):
            source_slices = tuple(slice(s.start * 2, min(s.stop * 2, n)) if a in DOWNSAMPLED_AXES else s
                                  for a, s, n in zip(axes, target_slices, source.shape))
            data = source[source_slices]
            if labels or np.any(data):
                target[target_slices] = downsample_block(data, axes, labels=labels)
            if on_block is not None:
                on_block()


def pyramid_block_count(arrays: list[zarr.Array], axes: str) -> int:
    return sum(block_count(target.shape, copy_block(axes, target.chunks)) for target in arrays[1:])


def block_count(shape: Sequence[int], block: Sequence[int]) -> int:
    return math.prod(math.ceil(s / b) for s, b in zip(shape, block))


def write_ome_zarr(path: str | Path, data: np.ndarray, axes: str, *, version: str = "0.5",
                   chunks: Sequence[int] | None = None, n_levels: int | None = None,
                   scale: Sequence[float] | None = None, units: dict[str, str] | None = None,
                   labels: dict[str, np.ndarray] | None = None, overwrite: bool = False) -> str:
    """Write an in-memory array (and optional label images) as a multiscale OME-Zarr; returns the path."""
    if data.ndim != len(axes):
        raise BioadaptError(f"data has {data.ndim} dimensions but axes '{axes}' name {len(axes)}")
    group, arrays = create_multiscale(path, axes=axes, shape=data.shape, dtype=data.dtype, chunks=chunks,
                                      n_levels=n_levels, version=version, scale=scale, units=units,
                                      overwrite=overwrite)
    arrays[0][...] = data
    build_pyramid(arrays, axes)
    for label_name, label_data in (labels or {}).items():
        write_label_image(group, label_name, label_data, image_axes=axes, version=version,
                          n_levels=len(arrays), chunks=chunks, scale=scale)
    return str(path)


def write_label_image(image_group: zarr.Group, name: str, data: np.ndarray, *, image_axes: str, version: str,
                      n_levels: int | None = None, chunks: Sequence[int] | None = None,
                      scale: Sequence[float] | None = None) -> zarr.Group:
    """Write ``labels/<name>`` (the image's axes without 'c') into an OME-Zarr image group."""
    label_axes = image_axes.replace("c", "")
    if data.ndim != len(label_axes):
        raise BioadaptError(f"label image '{name}' has {data.ndim} dimensions; expected {len(label_axes)} "
                            f"for axes '{label_axes}'")
    keep = [i for i, a in enumerate(image_axes) if a != "c"]
    labels_group = image_group.require_group("labels")
    label_group = labels_group.create_group(name, overwrite=True)
    _, arrays = create_multiscale(
        None, axes=label_axes, shape=data.shape, dtype=data.dtype, group=label_group,
        chunks=[chunks[i] for i in keep] if chunks is not None else None, n_levels=n_levels, version=version,
        scale=[scale[i] for i in keep] if scale is not None else None, name=name)
    arrays[0][...] = data
    build_pyramid(arrays, label_axes, labels=True)
    ngff.register_label(labels_group, name, version=version, source_image="../../")
    return label_group
