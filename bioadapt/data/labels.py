"""LabelStore: corrected labels as an OME-Zarr label image aligned with the source image.

Only the chunks a write touches are stored, and chunks that end up empty are not kept. Every write
is logged as a region (origin, shape, author, time) in a SQLite file beside the labels. Writers in
several processes are serialised by a file lock, so chunks shared by two windows stay consistent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr
from zarr.storage import LocalStore

from bioadapt.data import ngff
from bioadapt.data.image import Image
from bioadapt.data.locks import store_lock
from bioadapt.data.regions import Region, RegionLog
from bioadapt.data.stores import local_path
from bioadapt.data.windows import check_window
from bioadapt.data.writer import create_multiscale
from bioadapt.errors import BioadaptError

REGIONS_FILE = "bioadapt-regions.sqlite"
METADATA_KEY = "bioadapt"
MIN_CHUNK, MAX_CHUNK = 64, 1024  # bounds of the default label chunks along y and x


class LabelStore:
    """Sparse, region-logged labels for one image. Create with ``LabelStore.create``, reopen with ``open``."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = path
        self._group = group
        self._array: zarr.Array = group["0"]
        info = dict(group.attrs.get(METADATA_KEY) or {})
        multiscales = ngff.read_multiscales(group)
        self.axes: str = multiscales.axes if multiscales else info.get("axes", "")
        self.source_uri: str | None = info.get("source")
        self._regions = RegionLog(path / REGIONS_FILE)

    # -- creation --------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path | None, like: Image, *, name: str = "bioadapt",
               dtype: str | np.dtype = "uint32", chunks: Sequence[int] | None = None,
               exist_ok: bool = False) -> "LabelStore":
        """A new, empty label image shaped like ``like`` (its axes without 'c').

        ``path=None`` puts it under the source's ``labels/<name>`` (the source must be a local, writable
        OME-Zarr); otherwise ``path`` is a local directory that will hold ``<name>`` as an OME-Zarr label image.
        """
        dtype = np.dtype(dtype)
        if not np.issubdtype(dtype, np.unsignedinteger):
            raise BioadaptError(f"label dtype must be an unsigned integer type such as uint32, got {dtype}")
        if path is None:
            source = local_path(like.uri)
            if source is None or like.ngff_version is None:
                raise BioadaptError(f"cannot store labels inside '{like.uri}': it is not a local OME-Zarr; "
                                    "pass a local directory as path")
            if not os.access(source, os.W_OK):
                raise BioadaptError(f"cannot store labels inside '{source}': it is read-only; pass a local directory as path")
            container_path, source_ref = source / "labels", "../../"
        else:
            container_path = local_path(path)
            if container_path is None:
                raise BioadaptError(f"label stores live on a local or shared file system; '{path}' is remote")
            source_ref = like.uri
        version = like.ngff_version if like.ngff_version in ngff.SUPPORTED_VERSIONS else "0.5"
        fmt = ngff.ngff_format(version)
        container = zarr.open_group(store=LocalStore(container_path), mode="a", zarr_format=fmt.zarr_format)
        if name in container and not exist_ok:
            raise BioadaptError(f"a label store '{name}' already exists in '{container_path}': open it with "
                                "LabelStore.open or pass exist_ok=True")
        if name in container:
            return cls.open(container_path / name)
        label_axes = like.axes.replace("c", "")
        label_shape = [s for a, s in zip(like.axes, like.shape) if a != "c"]
        label_scale = [s for a, s in zip(like.axes, like.scale) if a != "c"]
        # the image's chunks, y and x within bounds: a TIFF's chunks are its strips (a few rows, or a whole page)
        default_chunks = [1 if a == "t" else min(max(c, MIN_CHUNK), MAX_CHUNK) if a in "yx" else c
                          for a, c in zip(like.axes, like.chunks) if a != "c"]
        chunks = tuple(chunks) if chunks is not None else tuple(default_chunks)
        if len(chunks) != len(label_axes):
            raise BioadaptError(f"chunks {chunks} must have one value per label axis '{label_axes}'")
        group = container.create_group(name)
        create_multiscale(None, axes=label_axes, shape=label_shape, dtype=dtype, chunks=chunks, n_levels=1,
                          version=version, scale=label_scale, units=like.units, name=name, group=group)
        group.attrs[METADATA_KEY] = {"source": like.uri, "source_axes": like.axes, "axes": label_axes}
        # ome-zarr-py writes image-label through its own handle: reopen afterwards so no stale attrs win
        ngff.register_label(container, name, version=version, source_image=source_ref)
        return cls.open(container_path / name)

    @classmethod
    def open(cls, path: str | Path, name: str | None = None) -> "LabelStore":
        """Reopen a label store: the label image directory, or its ``labels`` container and ``name``."""
        root = local_path(path)
        if root is None or not root.exists():
            raise BioadaptError(f"no label store at '{path}': the path does not exist")
        if name is not None:
            root = root / name
        try:
            group = zarr.open_group(store=LocalStore(root), mode="r+")
        except (FileNotFoundError, ValueError) as err:
            raise BioadaptError(f"'{root}' is not a Zarr group: give the label store's directory") from err
        if "0" not in group:
            raise BioadaptError(f"'{root}' is not a label image (no level '0'); "
                                f"label images here: {ngff.listed_labels(group) or 'none'}; pass name=")
        return cls(root, group)

    # -- description -----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._array.shape)

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self._array.chunks)

    @property
    def dtype(self) -> np.dtype:
        return self._array.dtype

    @property
    def spatial_axes(self) -> str:
        return self.axes.replace("t", "")

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(s for a, s in zip(self.axes, self.shape) if a != "t")

    def chunk_files(self) -> list[str]:
        """Relative paths of the chunk files stored on disk (what annotation has cost in storage)."""
        array_dir = self.path / "0"
        metadata = {"zarr.json", ".zarray", ".zattrs", ".zgroup"}
        return sorted(str(p.relative_to(array_dir)) for p in array_dir.rglob("*")
                      if p.is_file() and p.name not in metadata)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "source": self.source_uri, "axes": self.axes, "shape": list(self.shape),
                "chunks": list(self.chunks), "dtype": str(self.dtype)}

    # -- reading and writing ---------------------------------------------------------------------
    def write(self, origin: Sequence[int], labels: np.ndarray, author: str = "unknown", *,
              time: int | None = None) -> Region:
        """Store ``labels`` (spatial axes) at ``origin``, replacing what was there, and log the region."""
        labels = self._check_labels(labels)
        index, time = self._index(origin, labels.shape, time)
        with store_lock(self.path, exclusive=True):
            self._array[index] = labels.astype(self.dtype, copy=False)
            return self._regions.record(tuple(int(o) for o in origin), labels.shape, author=str(author), time=time)

    def read(self, origin: Sequence[int], shape: Sequence[int], *, time: int | None = None) -> np.ndarray:
        """Labels in the window (zeros where nothing was annotated)."""
        index, _ = self._index(origin, shape, time)
        with store_lock(self.path, exclusive=False):
            return self._array[index]

    def regions(self, *, include_replaced: bool = False) -> list[Region]:
        """Every annotated region, oldest first; regions entirely rewritten later only with ``include_replaced``."""
        return self._regions.list(include_replaced=include_replaced)

    # -- helpers ---------------------------------------------------------------------------------
    def _check_labels(self, labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels)
        if labels.dtype == bool:
            labels = labels.astype(np.uint8)
        if not np.issubdtype(labels.dtype, np.integer):
            raise BioadaptError(f"labels must be integers (instance or class ids), got dtype {labels.dtype}; "
                                "round and cast them to an integer type")
        if labels.ndim != len(self.spatial_axes):
            raise BioadaptError(f"labels of shape {labels.shape} must have {len(self.spatial_axes)} dimensions, "
                                f"one per spatial axis '{self.spatial_axes}'")
        if labels.size and labels.min() < 0:
            raise BioadaptError("labels must not be negative: use 0 for background and 1, 2, ... for objects")
        if labels.size and int(labels.max()) > np.iinfo(self.dtype).max:
            raise BioadaptError(f"label value {int(labels.max())} does not fit the store's dtype {self.dtype}")
        return labels

    def _index(self, origin: Sequence[int], shape: Sequence[int], time: int | None) -> tuple[tuple, int | None]:
        spatial = check_window(origin, shape, self.spatial_shape, axes=self.spatial_axes,
                               where=f"the label store '{self.path}'")
        if "t" in self.axes:
            n_time = self.shape[self.axes.index("t")]
            time = 0 if time is None else int(time)
            if not 0 <= time < n_time:
                raise BioadaptError(f"time point {time} does not exist: the store has 0..{n_time - 1}")
            return (time, *spatial), time
        if time not in (None, 0):
            raise BioadaptError("this label store has no time axis: leave time unset")
        return tuple(spatial), None
