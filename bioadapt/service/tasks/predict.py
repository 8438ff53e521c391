"""Prediction: a region of a project image segmented tile by tile by a model version, into the image's
prediction store, or (small regions, ``return_array``) into the job's output ``labels``."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bioadapt.data import ImageRef
from bioadapt.errors import BioadaptError
from bioadapt.service import schemas as s
from bioadapt.service.context import Caller, ServiceContext
from bioadapt.service.jobs import JobRunner


TILE = 512
# image read around each tile: the model sees real context at the tile's borders, and objects crossing a border are
# seen whole by both tiles' segmentations, so their parts can be joined. Tiles are at least TILE / 2 wide when a
# region has several, so a window reaches only its neighbouring tiles.
CONTEXT = 64


def predict_region(adapter: Any, image: ImageRef, origin: Sequence[int], shape: Sequence[int], out: str | None,
                   tile: int = TILE, *, context: int = CONTEXT, stop: threading.Event | None = None,
                   progress: Callable[..., None] | None = None) -> np.ndarray | dict[str, Any]:
    """The worker body: segment a region tile by tile; labels go to the label store ``out`` (returned: where)
    or, without ``out``, come back as an array. Each axis is cut into equal tiles of at most ``tile`` pixels; each
    tile is segmented in a window ``context`` pixels wider on every side (within the image), and its objects
    that mostly cover an object of an earlier tile where the two windows overlap take that object's id, so an
    object cut by a tile border is one object. Other objects get new ids."""
    from bioadapt.data import LabelStore

    if context * 2 > tile:
        raise BioadaptError(f"context {context} must be at most half the tile size {tile}")
    opened = image.open()
    image_shape = opened.spatial_shape
    store = LabelStore.open(out) if out else None
    labels = None if store else np.zeros(tuple(shape), np.int32)
    cuts = [_equal_cuts(n, tile) for n in shape]
    grid = tuple(len(c) for c in cuts)
    tiles, last_id = 0, 0
    for index in np.ndindex(*grid):
        if stop is not None and stop.is_set():
            break
        core = [(o + c[i][0], o + c[i][1]) for o, c, i in zip(origin, cuts, index)]
        window = [(max(0, lo - context), min(n, hi + context)) for (lo, hi), n in zip(core, image_shape)]
        start, size = [lo for lo, _ in window], [hi - lo for lo, hi in window]
        segmented = adapter.segment(opened.read(start, size, dtype="float32")[None])[0]
        earlier = _earlier_labels(labels, store, origin, shape, cuts, index, window)
        inside = tuple(slice(lo - w, hi - w) for (lo, hi), w in zip(core, start))
        predicted, last_id = _joined(segmented, earlier, inside, last_id)
        core_start, core_size = [lo for lo, _ in core], [hi - lo for lo, hi in core]
        if store is not None:
            store.write(core_start, predicted.astype(np.uint32), author="bioadapt-model")
        else:
            labels[tuple(slice(a - o, a - o + z) for a, o, z in zip(core_start, origin, core_size))] = predicted
        tiles += 1
        if progress is not None:
            progress(done=tiles, total=math.prod(grid))
    return {"labels": out, "origin": list(origin), "shape": list(shape), "tiles": tiles} if store else labels


def _equal_cuts(n: int, tile: int) -> list[tuple[int, int]]:
    """[start, stop) of the fewest equal parts of at most ``tile`` pixels that cover ``n``."""
    count = max(1, -(-n // tile))
    edges = [round(i * n / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _earlier_labels(labels: np.ndarray | None, store: Any, origin: Sequence[int], shape: Sequence[int],
                    cuts: list[list[tuple[int, int]]], index: tuple[int, ...],
                    window: list[tuple[int, int]]) -> np.ndarray:
    """The labels this run already wrote over ``window``; -1 where it wrote none (a store may hold older ones)."""
    earlier = np.full([hi - lo for lo, hi in window], -1, np.int64)
    for offset in np.ndindex(*(3,) * len(index)):
        neighbour = tuple(i + d - 1 for i, d in zip(index, offset))
        if not neighbour < index or any(not 0 <= j < len(c) for j, c in zip(neighbour, cuts)):
            continue  # only tiles before this one in the loop's order are written
        box = [(max(o + c[j][0], lo), min(o + c[j][1], hi)) for o, c, j, (lo, hi) in zip(origin, cuts, neighbour,
                                                                                         window)]
        if any(lo >= hi for lo, hi in box):
            continue
        if store is not None:
            values = store.read([lo for lo, _ in box], [hi - lo for lo, hi in box])
        else:
            values = labels[tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, origin))]
        earlier[tuple(slice(lo - w, hi - w) for (lo, hi), (w, _) in zip(box, window))] = values
    return earlier


def _joined(segmented: np.ndarray, earlier: np.ndarray, inside: tuple[slice, ...], last_id: int
            ) -> tuple[np.ndarray, int]:
    """The tile's part of its window's segmentation with ids of the whole region: an object that, where earlier
    tiles were written, lies mostly on one earlier object takes its id; the others take ids after ``last_id``."""
    core = segmented[inside]
    ids = np.unique(core[core > 0])
    zone = (earlier >= 0) & (segmented > 0)  # this window's objects where earlier tiles were written
    in_zone = {int(k): int(n) for k, n in zip(*np.unique(segmented[zone], return_counts=True))}
    best: dict[int, tuple[int, int]] = {}  # object -> (earlier object it covers most, pixels)
    on_objects = zone & (earlier > 0)
    if on_objects.any():
        pairs, counts = np.unique(np.stack([segmented[on_objects], earlier[on_objects]]), axis=1,
                                  return_counts=True)
        for (new, old), count in zip(pairs.T, counts):
            if count > best.get(int(new), (0, 0))[1]:
                best[int(new)] = (int(old), int(count))
    mapping = np.zeros(int(segmented.max()) + 1, np.int64)
    for k in ids:
        old, count = best.get(int(k), (0, 0))
        if old and 2 * count >= in_zone.get(int(k), 0):
            mapping[k] = old
        else:
            last_id += 1
            mapping[k] = last_id
    return mapping[core].astype(np.int32), last_id


def submit(context: ServiceContext, caller: Caller, args: s.Predict,
           progress: Callable[[dict], Any] | None = None) -> dict[str, Any]:
    from bioadapt.data.windows import check_window

    project = context.owned_project(caller, args.project_id)
    row = context.image_row(project, args.image_id)
    version = context.version(project, args.version)
    if len(args.origin) != len(row["spatial_axes"]) or len(args.shape) != len(row["spatial_axes"]):
        raise BioadaptError(f"origin and shape need one value per spatial axis {row['spatial_axes']!r}")
    if args.return_array and math.prod(args.shape) > context.max_patch_pixels:
        raise BioadaptError(f"a region of {args.shape} is over the transfer limit of {context.max_patch_pixels} "
                            "pixels; leave return_array off to write it to the project's prediction store")
    check_window(args.origin, args.shape, context.opened_image(row).spatial_shape, axes=row["spatial_axes"],
                 where=f"image {row['id']}")
    runner = context.start_job("predict", lambda job: _predict(context, job, project, version, row, args), caller,
                               project, progress)
    return {"job_id": runner.job.id}


def _predict(context: ServiceContext, runner: JobRunner, project: dict[str, Any], version: dict[str, Any],
             row: dict[str, Any], args: s.Predict) -> dict[str, Any]:
    from bioadapt.service.execution import run_body

    spec = context.model_spec(project, version)
    actors = context.pool.lease(spec, 1, cancelled=runner.cancelled)
    if not actors:
        return {"tiles": 0}
    healthy = False
    try:
        result = run_body(runner, actors[0], predict_region, context.image_ref(row), tuple(args.origin),
                          tuple(args.shape), None if args.return_array else row["predictions"], what="prediction")
        healthy = True
    finally:
        context.pool.release(spec, actors, healthy=healthy)
    answer = {"origin": args.origin, "shape": args.shape, "version": version["number"]}
    if not args.return_array:
        return {**answer, **result}
    path = context.job_folder(project, runner.job.id) / "labels.npy"
    np.save(path, result)
    return {**answer, "outputs": {"labels": str(path)}}

