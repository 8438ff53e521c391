"""A lazy view of one OME-Zarr or plain Zarr image: axes, levels, and patch reads straight from the chunks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from bioadapt.data import ngff
from bioadapt.data.stores import join_uri, local_path, open_node, read_failure
from bioadapt.data.tiff import CONVERT_HINT, SUPPORTED, is_tiff_path, open_tiff
from bioadapt.data.windows import as_int_tuple, check_window
from bioadapt.errors import BioadaptError

SPATIAL_AXES = "zyx"


@dataclass(frozen=True)
class Level:
    """One resolution level of an image, in the source's axis order."""

    index: int
    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    scale: tuple[float, ...]
    factors: tuple[float, ...]  # level-0 pixels per pixel of this level, per spatial axis


def validate_axes(axes: str, ndim: int, *, where: str) -> str:
    """Lower-cased axes string, checked against the array's number of dimensions."""
    if not isinstance(axes, str):
        raise BioadaptError(f"axes must be a string such as 'yx' or 'czyx', got {axes!r}")
    axes = axes.lower()
    unknown = sorted(set(axes) - set(ngff.CANONICAL_ORDER))
    if unknown:
        raise BioadaptError(f"axes '{axes}' for {where} contain {unknown}: use letters from 't', 'c', 'z', 'y', 'x'")
    if len(set(axes)) != len(axes):
        raise BioadaptError(f"axes '{axes}' for {where} repeat a letter: each axis may appear once")
    if "y" not in axes or "x" not in axes:
        raise BioadaptError(f"axes '{axes}' for {where} lack 'y' or 'x': images need both")
    if len(axes) != ndim:
        raise BioadaptError(
            f"axes '{axes}' have {len(axes)} letters but {where} has {ndim} dimensions: give one letter per dimension"
        )
    return axes


class Image:
    """A lazily read image. Patches come back as (C, [Z], Y, X) in the source dtype."""

    def __init__(self, uri: str, arrays: list[zarr.Array], axes: str, levels: list[Level], *,
                 channels: Sequence[int] | None, time: int | None, ngff_version: str | None,
                 units: dict[str, str], name: str | None, group: zarr.Group | None,
                 storage_options: dict[str, Any] | None):
        self.uri = uri
        self.axes = axes
        self.levels = levels
        self.ngff_version = ngff_version
        self.units = units
        self.name = name
        self.storage_options = storage_options
        self._arrays = arrays
        self._group = group
        self.channels = self._check_channels(channels)
        self.time = self._check_time(time)

    # -- description -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.levels[0].shape

    @property
    def dtype(self) -> np.dtype:
        return self._arrays[0].dtype

    @property
    def chunks(self) -> tuple[int, ...]:
        return self.levels[0].chunks

    @property
    def scale(self) -> tuple[float, ...]:
        """Physical size of a level-0 pixel along each source axis."""
        return self.levels[0].scale

    @property
    def zarr_format(self) -> int:
        return self._arrays[0].metadata.zarr_format

    @property
    def spatial_axes(self) -> str:
        return "".join(a for a in SPATIAL_AXES if a in self.axes)

    def spatial_shape_of(self, level: int = 0) -> tuple[int, ...]:
        lvl = self.levels[level]
        return tuple(lvl.shape[self.axes.index(a)] for a in self.spatial_axes)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.spatial_shape_of(0)

    @property
    def spatial_chunks(self) -> tuple[int, ...]:
        return tuple(self.chunks[self.axes.index(a)] for a in self.spatial_axes)

    @property
    def spatial_scale(self) -> tuple[float, ...]:
        return tuple(self.scale[self.axes.index(a)] for a in self.spatial_axes)

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def n_timepoints(self) -> int:
        return self.shape[self.axes.index("t")] if "t" in self.axes else 1

    @property
    def label_names(self) -> list[str]:
        """Label images stored under this OME-Zarr's ``labels/`` group."""
        return ngff.label_names(self._group) if self._group is not None else []

    def level_array(self, level: int = 0) -> zarr.Array:
        """The Zarr array of one level (for callers that need chunk-level access)."""
        return self._arrays[level]

    def to_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri, "axes": self.axes, "shape": list(self.shape), "dtype": str(self.dtype),
            "chunks": list(self.chunks), "scale": list(self.scale), "units": dict(self.units),
            "channels": list(self.channels), "time": self.time, "ngff_version": self.ngff_version,
            "levels": [{"path": lv.path, "shape": list(lv.shape), "factors": list(lv.factors)} for lv in self.levels],
        }

    def __repr__(self) -> str:
        return (f"Image('{self.uri}', axes='{self.axes}', shape={self.shape}, dtype={self.dtype}, "
                f"levels={len(self.levels)}, channels={list(self.channels)}, time={self.time})")

    # -- reading -------------------------------------------------------------------------------
    def read(self, origin: Sequence[int], shape: Sequence[int], *, level: int = 0,
             dtype: np.dtype | str | None = None) -> np.ndarray:
        """Read the window ``origin``/``shape`` (spatial axes, z y x order) as (C, [Z], Y, X).

        Only the chunks the window overlaps are read. ``dtype`` casts the result (e.g. float32).
        """
        if not 0 <= level < len(self.levels):
            raise BioadaptError(f"level {level} does not exist: this image has levels 0..{len(self.levels) - 1}")
        slices = self.window_slices(origin, shape, level=level)
        index: list[Any] = []
        channel_pick = None
        for axis in self.axes:
            if axis == "t":
                index.append(self.time)
            elif axis == "c":
                first, last = min(self.channels), max(self.channels)
                index.append(slice(first, last + 1))
                if list(self.channels) != list(range(first, last + 1)):
                    channel_pick = [c - first for c in self.channels]
            else:
                index.append(slices[self.spatial_axes.index(axis)])
        try:
            data = self._arrays[level][tuple(index)]
        except MemoryError:
            raise
        except Exception as err:  # a damaged chunk, a store that fails or hangs: say which and where
            raise read_failure(self.uri, err, f"the pixels at {list(origin)} (level {level})") from err
        kept_axes = [a for a in self.axes if a != "t"]
        target = (["c"] if "c" in kept_axes else []) + list(self.spatial_axes)
        order = [kept_axes.index(a) for a in target]
        if order != sorted(order):
            data = np.transpose(data, order)
        if "c" not in kept_axes:
            data = data[np.newaxis]
        elif channel_pick is not None:
            data = data[channel_pick]
        if dtype is not None:
            data = data.astype(dtype, copy=False)
        return data

    def check_decodes(self) -> None:
        """Read the first chunk of level 0 (one request for a remote image): an image whose chunks do not decode,
        whose store does not answer, or whose pixels are NaN or infinite is refused when it is added rather than
        when its patches are scored."""
        shape = tuple(min(c, s) for c, s in zip(self.spatial_chunks, self.spatial_shape))
        pixels = self.read((0,) * len(shape), shape)
        if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
            raise BioadaptError(f"'{self.uri}' holds NaN or infinite pixels (in its first chunk, {list(shape)} "
                                "pixels from the origin); models cannot score them: fill them (e.g. with 0) first")

    def read_level(self, level: int = -1, *, max_pixels: int = 64_000_000,
                   dtype: np.dtype | str | None = None) -> np.ndarray:
        """A whole (coarse) level as (C, [Z], Y, X); refuses levels larger than ``max_pixels``."""
        level = level % len(self.levels)
        spatial = self.spatial_shape_of(level)
        if math.prod(spatial) * self.n_channels > max_pixels:
            raise BioadaptError(
                f"level {level} of '{self.uri}' has shape {spatial}, more than {max_pixels} pixels: "
                "read patches with Image.read or pick a coarser level")
        return self.read((0,) * len(spatial), spatial, level=level, dtype=dtype)

    def window_slices(self, origin: Sequence[int], shape: Sequence[int], *, level: int = 0) -> tuple[slice, ...]:
        """Check a window against the image and return its spatial slices."""
        return check_window(origin, shape, self.spatial_shape_of(level), axes=self.spatial_axes,
                            where=f"the image '{self.uri}' at level {level}")

    # -- related images -------------------------------------------------------------------------
    def label_image(self, name: str) -> "Image":
        """Open the label image ``labels/<name>`` of this OME-Zarr."""
        if name not in self.label_names:
            raise BioadaptError(f"'{self.uri}' has no label image '{name}'; it has {self.label_names or 'none'}")
        return open_image(join_uri(self.uri, "labels", name), storage_options=self.storage_options)

    # -- checks ----------------------------------------------------------------------------------
    def _check_channels(self, channels: Sequence[int] | int | None) -> tuple[int, ...]:
        n_available = self.shape[self.axes.index("c")] if "c" in self.axes else 1
        if channels is None:
            return tuple(range(n_available))
        if isinstance(channels, (int, np.integer)):
            channels = [int(channels)]
        picked = as_int_tuple(channels, "channels")
        if not picked:
            raise BioadaptError("channels is empty: pick at least one channel, or pass None for all")
        bad = [c for c in picked if not 0 <= c < n_available]
        if bad:
            raise BioadaptError(f"channels {bad} do not exist: '{self.uri}' has channels 0..{n_available - 1}")
        return picked

    def _check_time(self, time: int | None) -> int | None:
        if "t" not in self.axes:
            if time not in (None, 0):
                raise BioadaptError(f"'{self.uri}' has no time axis (axes '{self.axes}'): leave time at 0")
            return None
        time = 0 if time is None else int(time)
        n_time = self.shape[self.axes.index("t")]
        if not 0 <= time < n_time:
            raise BioadaptError(f"time point {time} does not exist: '{self.uri}' has time points 0..{n_time - 1}")
        return time


def _level_factors(axes: str, shape0: tuple[int, ...], shape: tuple[int, ...],
                   scale0: tuple[float, ...], scale: tuple[float, ...]) -> tuple[float, ...]:
    factors = []
    for axis in SPATIAL_AXES:
        if axis not in axes:
            continue
        i = axes.index(axis)
        from_scale = scale[i] / scale0[i] if scale0[i] else 0.0
        from_shape = shape0[i] / shape[i]
        # Trust the coordinate transformations unless they contradict the shapes (metadata left at 1.0).
        factors.append(from_scale if from_scale > 0 and abs(from_scale - from_shape) <= max(1.0, 0.05 * from_shape)
                       else from_shape)
    return tuple(factors)


def open_image(uri: str | Path, axes: str | None = None, channels: Sequence[int] | int | None = None, *,
               time: int | None = 0, storage_options: dict[str, Any] | None = None) -> Image:
    """Open an OME-Zarr (NGFF 0.4/0.5), a plain Zarr array, or a local TIFF / OME-TIFF file lazily.

    ``axes`` is required for plain arrays, must match the metadata for OME-Zarr, and overrides the axes
    tifffile reads from a TIFF (one letter per dimension of its squeezed shape). TIFFs are read in place through
    tifffile's Zarr store, chunk by chunk (the file's tiles or strips); for large images without tiles or a
    pyramid, ``bioadapt convert`` writes a chunked, multiscale OME-Zarr that reads faster.
    ``channels`` picks the channels to feed (default all); ``time`` the time point.
    """
    uri = str(uri)
    path = local_path(uri)
    if path is not None and path.is_file():
        return _open_tiff_image(uri, path, axes, channels, time)
    if path is None and is_tiff_path(uri.split("?")[0]):
        raise BioadaptError(f"'{uri}' is a remote TIFF: TIFF files are read in place from local paths only; copy it "
                            f"here, or {CONVERT_HINT}")
    node = open_node(uri, storage_options=storage_options)
    if isinstance(node, zarr.Group):
        multiscales = ngff.read_multiscales(node)
        if multiscales is None:
            arrays = sorted(name for name, _ in node.arrays())
            hint = f" open one of its arrays ({', '.join(arrays)}) with axes=..." if arrays else ""
            raise BioadaptError(f"'{uri}' is a Zarr group without OME-NGFF multiscales metadata;{hint} "
                                "or convert the image with `bioadapt convert`")
        if axes is not None and axes.lower() != multiscales.axes:
            raise BioadaptError(f"axes '{axes}' do not match the OME-NGFF axes '{multiscales.axes}' of '{uri}': "
                                "leave axes=None to use the metadata")
        arrays = []
        for level in multiscales.levels:
            try:
                arrays.append(node[level.path])
            except (KeyError, FileNotFoundError) as err:
                raise BioadaptError(f"'{uri}' lists level '{level.path}' in its metadata but has no such array") from err
        image_axes = validate_axes(multiscales.axes, arrays[0].ndim, where=f"'{uri}'")
        scales = [lv.scale for lv in multiscales.levels]
        paths = [lv.path for lv in multiscales.levels]
        version, units, name, group = multiscales.version, multiscales.units, multiscales.name, node
    else:
        if axes is None:
            raise BioadaptError(f"'{uri}' is a plain Zarr array of shape {node.shape} without axes metadata: pass "
                                "axes=, one letter per dimension from 't', 'c', 'z', 'y', 'x' (e.g. 'yx' or 'czyx')")
        image_axes = validate_axes(axes, node.ndim, where=f"'{uri}' (shape {node.shape})")
        arrays, scales, paths = [node], [(1.0,) * node.ndim], [""]
        version, units, name, group = None, {}, None, None
    levels = [
        Level(index=i, path=path, shape=tuple(arr.shape), chunks=tuple(arr.chunks), scale=tuple(scale),
              factors=_level_factors(image_axes, arrays[0].shape, arr.shape, scales[0], scale))
        for i, (path, arr, scale) in enumerate(zip(paths, arrays, scales))
    ]
    return Image(uri, arrays, image_axes, levels, channels=channels, time=time, ngff_version=version,
                 units=units, name=name, group=group, storage_options=storage_options)


def _open_tiff_image(uri: str, path: Path, axes: str | None, channels: Sequence[int] | int | None,
                     time: int | None) -> Image:
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # classic and BigTIFF, both byte orders
        raise BioadaptError(f"'{uri}' is a file but not a TIFF: bioadapt opens {SUPPORTED}. Save other formats as "
                            f"TIFF or OME-Zarr first; {CONVERT_HINT}")
    tiff = open_tiff(path, axes)
    image_axes = validate_axes(tiff.axes, tiff.arrays[0].ndim, where=f"'{uri}' (shape {tiff.arrays[0].shape})")
    levels = [Level(index=i, path=str(i), shape=tuple(a.shape), chunks=tuple(a.chunks), scale=scale,
                    factors=_level_factors(image_axes, tiff.arrays[0].shape, a.shape, tiff.scales[0], scale))
              for i, (a, scale) in enumerate(zip(tiff.arrays, tiff.scales))]
    return Image(uri, tiff.arrays, image_axes, levels, channels=channels, time=time, ngff_version=None,
                 units=tiff.units, name=tiff.name, group=None, storage_options=None)
