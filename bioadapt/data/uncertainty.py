"""UncertaintyStore: the uncertainty maps of one image's scored patches (what a person reads: by default where the
MC passes disagree on objects, ``bioadapt.active.maps``) as a float32 OME-Zarr image aligned with it.

Level 0 lies on the image's spatial grid and holds the maps of the scored patches (NaN where nothing was scored;
chunks never written cost nothing). The coarser levels are the overview: NaN-aware 2 x 2 means of the level
above, so napari or a browser can show a whole slide's uncertainty over the slide. Scoring workers write level 0
(``write``); whoever drives the scoring rebuilds the overview where patches landed (``update_overview``).
Writers in several processes are serialised by the store's file lock.
"""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr
from zarr.storage import LocalStore

from bioadapt.data import ngff
from bioadapt.data.image import Image
from bioadapt.data.locks import store_lock
from bioadapt.data.stores import local_path
from bioadapt.data.windows import check_window
from bioadapt.data.writer import DOWNSAMPLED_AXES, auto_level_count, create_multiscale
from bioadapt.errors import BioadaptError

Window = tuple[Sequence[int], Sequence[int]]  # (level-0 origin, shape) along the spatial axes


class UncertaintyStore:
    """Create with ``UncertaintyStore.create(path, like=image)``, reopen with ``UncertaintyStore.open(path)``."""

    def __init__(self, path: Path, group: zarr.Group):
        multiscales = ngff.read_multiscales(group)
        if multiscales is None:
            raise BioadaptError(f"'{path}' is not an OME-Zarr image (no multiscales metadata)")
        self.path = path
        self.axes = multiscales.axes
        self._levels: list[zarr.Array] = [group[level.path] for level in multiscales.levels]

    @classmethod
    def create(cls, path: str | Path, like: Image, *, chunks: Sequence[int] | None = None,
               n_levels: int | None = None) -> "UncertaintyStore":
        """An empty store on ``like``'s spatial grid (its physical scale and units), levels down to ~512 pixels."""
        folder = local_path(path)
        if folder is None:
            raise BioadaptError(f"uncertainty stores live on a local or shared file system; '{path}' is remote")
        axes, shape = like.spatial_axes, like.spatial_shape
        chunks = tuple(chunks) if chunks is not None else tuple(min(256 if a in DOWNSAMPLED_AXES else 32, s)
                                                                for a, s in zip(axes, shape))
        version = like.ngff_version if like.ngff_version in ngff.SUPPORTED_VERSIONS else "0.5"
        create_multiscale(folder, axes=axes, shape=shape, dtype="float32", chunks=chunks,
                          n_levels=n_levels or auto_level_count(axes, shape), version=version,
                          scale=like.spatial_scale, units={a: u for a, u in like.units.items() if a in axes},
                          name="uncertainty", fill_value=float("nan"))
        return cls.open(folder)

    @classmethod
    def open(cls, path: str | Path) -> "UncertaintyStore":
        folder = local_path(path)
        if folder is None or not folder.exists():
            raise BioadaptError(f"no uncertainty store at '{path}': the path does not exist")
        return cls(folder, zarr.open_group(store=LocalStore(folder), mode="r+"))

    # -- description -----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._levels[0].shape)

    @property
    def n_levels(self) -> int:
        return len(self._levels)

    def level_shape(self, level: int) -> tuple[int, ...]:
        return tuple(self._levels[level % self.n_levels].shape)

    def factors(self, level: int) -> tuple[float, ...]:
        """Level-0 pixels per pixel of ``level`` along each axis."""
        return tuple(float(s) / float(n) for s, n in zip(self.shape, self.level_shape(level)))

    # -- reading and writing ---------------------------------------------------------------------
    def write(self, origin: Sequence[int], values: np.ndarray) -> None:
        """Store a map (spatial axes) at the level-0 ``origin``."""
        values = np.asarray(values, dtype=np.float32)
        window = check_window(origin, values.shape, self.shape, axes=self.axes, where=f"'{self.path}'")
        with store_lock(self.path, exclusive=True):
            self._levels[0][window] = values

    def read(self, origin: Sequence[int], shape: Sequence[int], *, level: int = 0) -> np.ndarray:
        """The map in a window of ``level`` (NaN where nothing was scored)."""
        array = self._levels[level % self.n_levels]
        window = check_window(origin, shape, array.shape, axes=self.axes, where=f"level {level} of '{self.path}'")
        with store_lock(self.path, exclusive=False):
            return array[window]

    def update_overview(self, windows: Sequence[Window] | None = None) -> int:
        """Rebuild the coarser levels where the level-0 ``windows`` lie (everywhere with None), chunk by chunk;
        returns the number of chunks rewritten."""
        touched = [(tuple(o), tuple(s)) for o, s in windows] if windows is not None else [
            ((0,) * len(self.shape), self.shape)]
        rewritten = 0
        for level in range(1, self.n_levels):
            source, target = self._levels[level - 1], self._levels[level]
            divisor = [2**level if a in DOWNSAMPLED_AXES else 1 for a in self.axes]
            chunks = set()
            for origin, shape in touched:
                first = [o // d // c for o, d, c in zip(origin, divisor, target.chunks)]
                last = [(-(-(o + s) // d) - 1) // c for o, s, d, c in zip(origin, shape, divisor, target.chunks)]
                chunks.update(itertools.product(*[range(f, min(l, -(-n // c) - 1) + 1)
                                                  for f, l, n, c in zip(first, last, target.shape, target.chunks)]))
            for chunk in sorted(chunks):
                target_slices = tuple(slice(i * c, min((i + 1) * c, n))
                                      for i, c, n in zip(chunk, target.chunks, target.shape))
                source_slices = tuple(slice(t.start * 2, min(t.stop * 2, n)) if a in DOWNSAMPLED_AXES else t
                                      for a, t, n in zip(self.axes, target_slices, source.shape))
                with store_lock(self.path, exclusive=False):
                    block = source[source_slices]
                reduced = nan_downsample(block, self.axes)
                reduced = reduced[tuple(slice(0, t.stop - t.start) for t in target_slices)]
                with store_lock(self.path, exclusive=True):
                    target[target_slices] = reduced
                rewritten += 1
        return rewritten

    def overview(self, max_pixels: int = 1024 * 1024) -> tuple[int, np.ndarray]:
        """(level, the whole level): the finest level of at most ``max_pixels`` pixels (else the coarsest)."""
        fitting = [i for i in range(self.n_levels) if math.prod(self.level_shape(i)) <= max_pixels]
        level = fitting[0] if fitting else self.n_levels - 1
        return level, self.read((0,) * len(self.shape), self.level_shape(level), level=level)


def nan_downsample(block: np.ndarray, axes: str) -> np.ndarray:
    """Halve the y and x axes by 2 x 2 means of the finite values (NaN where a 2 x 2 cell has none)."""
    pad = [(0, s % 2) if a in DOWNSAMPLED_AXES else (0, 0) for a, s in zip(axes, block.shape)]
    if any(p[1] for p in pad):
        block = np.pad(block, pad, constant_values=np.nan)
    shape: list[int] = []
    pairs: list[int] = []
    for a, s in zip(axes, block.shape):
        if a in DOWNSAMPLED_AXES:
            shape.extend([s // 2, 2])
            pairs.append(len(shape) - 1)
        else:
            shape.append(s)
    cells = block.reshape(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells: NaN is the answer
        return np.nanmean(cells, axis=tuple(pairs)).astype(np.float32)
