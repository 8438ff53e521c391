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


def predict_region(adapter: Any, image: ImageRef, origin: Sequence[int], shape: Sequence[int], out: str | None,
                   tile: int = TILE, *, stop: threading.Event | None = None,
                   progress: Callable[..., None] | None = None) -> np.ndarray | dict[str, Any]:
    """The worker body: segment a region tile by tile; labels go to the label store ``out`` (returned: where)
    or, without ``out``, come back as an array. Objects are segmented per tile: each tile's ids follow the
    previous tiles' (so objects of different tiles never share an id), and an object cut by a tile border keeps
    two ids."""
    from bioadapt.data import LabelStore

    opened = image.open()
    store = LabelStore.open(out) if out else None
    labels = None if store else np.zeros(tuple(shape), np.int32)
    grid = [max(1, -(-n // tile)) for n in shape]
    tiles, last_id = 0, 0
    for tile_origin in np.ndindex(*grid):
        if stop is not None and stop.is_set():
            break
        start = [o + t * tile for o, t in zip(origin, tile_origin)]
        size = [min(tile, o + n - a) for o, n, a in zip(origin, shape, start)]
        predicted = adapter.segment(opened.read(start, size, dtype="float32")[None])[0]
        predicted = np.where(predicted > 0, predicted + last_id, 0)  # ids 1..n of every tile would collide
        last_id = max(last_id, int(predicted.max()))
        if store is not None:
            store.write(start, predicted.astype(np.uint32), author="bioadapt-model")
        else:
            labels[tuple(slice(a - o, a - o + z) for a, o, z in zip(start, origin, size))] = predicted
        tiles += 1
        if progress is not None:
            progress(done=tiles, total=math.prod(grid))
    return {"labels": out, "origin": list(origin), "shape": list(shape), "tiles": tiles} if store else labels


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

