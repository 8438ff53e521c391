"""The Ray side: model actors that load their adapter once, read their own patches from Zarr, score them,
write predictions and uncertainty maps, and fine-tune; how many there are and what resources they take.

The driver only sends coordinates and paths: pixels move between Zarr and the actors, never through the driver.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bioadapt.errors import BioadaptError

log = logging.getLogger(__name__)

# torch threads (and Ray CPUs) per model actor or task. One: on the 2 busy cores we measured, a fine-tuning
# step took 137 ms with one thread and 1.5 s with two (benchmarks/bench_threads.py, results/threads*.json);
# more actors, not more threads per actor, use more cores. A model's options may set "threads".
WORKER_THREADS = 1


@dataclass(frozen=True)
class ImageRef:
    """What a worker needs to open an image itself."""

    uri: str
    axes: str | None = None
    channels: tuple[int, ...] | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    def open(self):
        from bioadapt.data import open_image

        try:
            return open_image(self.uri, self.axes, list(self.channels) if self.channels else None,
                              storage_options=self.storage_options or None)
        except Exception as e:
            raise BioadaptError(f"worker on {os.uname().nodename} cannot open image {self.uri!r}: {e}. On a "
                                "cluster, image URIs must be reachable from every worker (shared storage, s3://, "
                                "http://)") from e


@dataclass(frozen=True)
class ScoreRequest:
    image: ImageRef
    patch_shape: tuple[int, ...]
    passes: int = 16
    acquisition: str = "bald"
    reduce: str = "mean"  # see bioadapt.active.patch_score
    seed: int = 0
    predictions: str | None = None  # LabelStore path for the model's segmentation of each patch
    uncertainty: str | None = None  # Zarr array path for the per-pixel acquisition map
    mask: str | None = None  # the image's sampling mask (label image name or "auto"): scores count pixels inside it
    features: bool = False  # also return the model's pooled features of each patch (for selection rules)


def patch_seed(seed: int, patch_id: int) -> int:
    """One seed per patch for the random baseline, so its scores do not depend on how patches are sharded."""
    return (seed * 1_000_003 + patch_id) % (2**31)


def score_patches(adapter: Any, request: ScoreRequest, patches: Sequence[tuple[int, Sequence[int]]],
                  stop: threading.Event | None = None) -> list[dict[str, Any]]:
    """Score (patch id, origin) pairs: read, MC passes, acquisition map, patch score, segmentation, writes."""
    from bioadapt.active import ACQUISITIONS, patch_score
    from bioadapt.data.sampling import resolve_mask

    if request.acquisition not in ACQUISITIONS:
        raise BioadaptError(f"unknown acquisition {request.acquisition!r}; known: {sorted(ACQUISITIONS)}")
    image = request.image.open()
    sampling_mask = resolve_mask(image, request.mask)
    predictions = _open_predictions(request.predictions)
    uncertainty = _open_uncertainty(request.uncertainty)
    activation = adapter.describe().activation
    function = ACQUISITIONS[request.acquisition]
    results = []
    for patch_id, origin in patches:
        if stop is not None and stop.is_set():
            break
        started = time.perf_counter()
        pixels = image.read(origin, request.patch_shape, dtype="float32")
        if not np.isfinite(pixels).all():
            raise BioadaptError(f"patch {patch_id} at {list(origin)} of {request.image.uri} holds NaN or infinite "
                                "pixels; fill them (or exclude that region with a sampling mask) before scoring")
        # one MC seed for the whole round: every patch sees the same dropout masks (common random numbers),
        # so score differences come from the patches, not from the masks each happened to draw
        samples = adapter.mc_proba(pixels[None], passes=request.passes, seed=request.seed)[:, 0]
        score_map = function(samples, activation=activation,
                             **({"seed": patch_seed(request.seed, patch_id)} if request.acquisition == "random"
                                else {}))
        labels = adapter.segment(pixels[None])[0]
        if predictions is not None:
            predictions.write(origin, labels.astype(np.uint32), author="bioadapt-model")
        if uncertainty is not None:
            uncertainty[tuple(slice(o, o + s) for o, s in zip(origin, request.patch_shape))] = score_map
        inside = None if sampling_mask is None else sampling_mask.window(origin, request.patch_shape)
        if inside is not None and not inside.any():  # a window that only grazes the mask
            inside = None
        result = {"patch_id": int(patch_id), "origin": [int(o) for o in origin],
                  "score": patch_score(score_map, inside, reduce=request.reduce, labels=labels),
                  "objects": int(len(np.unique(labels)) - 1)}
        if request.features:
            result["features"] = [float(v) for v in adapter.patch_features(pixels[None])[0]]
        results.append(result | {"seconds": round(time.perf_counter() - started, 4)})
    return results


def _open_predictions(path: str | None):
    if path is None:
        return None
    from bioadapt.data import LabelStore

    return LabelStore.open(path)


def _open_uncertainty(path: str | None):
    if path is None:
        return None
    import zarr

    return zarr.open_array(path, mode="r+")


def create_uncertainty_store(path: str | Path, image: Any, chunks: Sequence[int] | None = None) -> str:
    """A float32 Zarr array on the image's spatial grid for per-pixel acquisition maps; empty chunks are not
    written, so it grows with what was scored."""
    import zarr

    shape = image.spatial_shape
    chunks = tuple(chunks or [min(256, s) for s in shape])
    zarr.create_array(str(path), shape=shape, chunks=chunks, dtype="float32", fill_value=np.nan,
                      config={"write_empty_chunks": False}, overwrite=True)
    return str(path)


@dataclass(frozen=True)
class LabelledRegion:
    """An annotated patch a worker reads itself: image, label store and window."""

    image: ImageRef
    label_store: str
    origin: tuple[int, ...]
    shape: tuple[int, ...]

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        from bioadapt.data import LabelStore

        pixels = self.image.open().read(self.origin, self.shape, dtype="float32")
        return pixels, LabelStore.open(self.label_store).read(self.origin, self.shape).astype(np.int64)


@dataclass(frozen=True)
class FineTuneRequest:
    regions: tuple[LabelledRegion, ...]  # the corrected patches, read by the worker
    params: dict[str, Any] = field(default_factory=dict)


def training_samples(request: FineTuneRequest) -> list[tuple[np.ndarray, np.ndarray]]:
    return [region.read() for region in request.regions]


def segments_instances(info: dict[str, Any]) -> bool:
    """Whether ``segment`` gives instances (Cellpose; sigmoid with foreground [+ boundaries]) or classes."""
    return info["output_kind"] == "cellpose" or (info["output_kind"] == "sigmoid" and info["n_classes"] <= 2)


class ModelWorker:
    """What a model actor runs (a plain class, so it is testable without Ray)."""

    def __init__(self, source: str | bytes, options: dict[str, Any] | None = None, weights: str | None = None):
        from bioadapt.adapters import load_adapter

        self._tmp = None
        if isinstance(source, bytes):  # a package sent once through the object store
            self._tmp = tempfile.TemporaryDirectory(prefix="bioadapt-model-")
            path = Path(self._tmp.name) / "model.zip"
            path.write_bytes(source)
            source = str(path)
        try:
            self.adapter = load_adapter(source, **{"threads": WORKER_THREADS, **(options or {})})
        except Exception as e:
            raise BioadaptError(f"worker on {os.uname().nodename} cannot load model {source!r}: {e}") from e
        if weights is not None:
            self.load_weights(weights)
        self._stop = threading.Event()
        self._progress: dict[str, Any] = {}

    def load_weights(self, path: str) -> None:
        """Replace the model's weights by a saved version (a state dict written by ``fine_tune``)."""
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise BioadaptError(f"worker on {os.uname().nodename} cannot read model weights {path!r}: {e}. On a "
                                "cluster, the project folder must be on storage every worker reaches") from e
        self.adapter.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        return self.adapter.describe().to_dict()

    def score(self, request: ScoreRequest, patches: Sequence[tuple[int, Sequence[int]]]) -> list[dict[str, Any]]:
        self._stop.clear()
        return score_patches(self.adapter, request, patches, self._stop)

    def fine_tune(self, request: FineTuneRequest) -> dict[str, Any]:
        """Train on the corrected regions; returns the result and the new weights as bytes."""
        import io

        import torch

        self._stop.clear()
        self._progress = {}
        result = self.adapter.fine_tune(training_samples(request), request.params,
                                        progress=self._progress.update, stop=self._stop.is_set)
        buffer = io.BytesIO()
        torch.save(self.adapter.state_dict(), buffer)
        return {"result": result.to_dict(), "weights": buffer.getvalue()}

    def evaluate(self, regions: Sequence[LabelledRegion]) -> dict[str, Any]:
        """The model's segmentation of each region against its labels: F1 / AP at IoU 0.5 pooled over the
        regions for instance models, mean Dice for semantic ones."""
        from bioadapt.active.metrics import dice, match_instances, summarize_matches

        if not regions:
            raise BioadaptError("nothing to evaluate: no held-out annotated patches yet; annotate more patches")
        instances = segments_instances(self.describe())
        matches, dices = [], []
        for region in regions:
            pixels, truth = region.read()
            predicted = self.adapter.segment(pixels[None])[0]
            if instances:
                matches.append(match_instances(predicted, truth, 0.5))
            else:
                dices.append(dice(predicted, truth))
        if instances:
            summary = summarize_matches(matches)
            return {"metric": "f1@0.5", "f1": summary["f1"], "ap": summary["ap"], "tp": summary["tp"],
                    "fp": summary["fp"], "fn": summary["fn"], "patches": len(regions)}
        return {"metric": "dice", "dice": float(np.mean(dices)), "patches": len(regions)}

    def predict(self, image: ImageRef, origin: Sequence[int], shape: Sequence[int], out: str | None = None,
                tile: int = 512) -> np.ndarray | dict[str, Any]:
        """Segment a region tile by tile; labels go to the label store ``out`` (returned: where) or, without
        ``out``, come back as an array."""
        from bioadapt.data import LabelStore

        opened = image.open()
        store = LabelStore.open(out) if out else None
        labels = None if store else np.zeros(tuple(shape), np.int32)
        tiles = 0
        for tile_origin in np.ndindex(*[max(1, -(-s // tile)) for s in shape]):
            start = [o + t * tile for o, t in zip(origin, tile_origin)]
            size = [min(tile, o + s - a) for o, s, a in zip(origin, shape, start)]
            predicted = self.adapter.segment(opened.read(start, size, dtype="float32")[None])[0]
            if store is not None:  # ids are per tile: objects cut by a tile border keep two ids
                store.write(start, predicted.astype(np.uint32), author="bioadapt-model")
            else:
                labels[tuple(slice(a - o, a - o + z) for a, o, z in zip(start, origin, size))] = predicted
            tiles += 1
        return {"labels": out, "origin": list(origin), "shape": list(shape), "tiles": tiles} if store else labels

    def export(self, out: str, metadata: dict[str, Any], training: dict[str, Any],
               test_region: LabelledRegion | None = None, fine_tune_record: dict[str, Any] | None = None) -> str:
        """Write the model (with its current weights) as a bioimage.io package that passes the model test;
        ``fine_tune_record`` ({"params", "result"}) documents the training of weights loaded from a file."""
        from bioadapt.exporters import export_bioimageio

        if fine_tune_record:
            self.adapter.record_training(fine_tune_record.get("params", {}), fine_tune_record.get("result", {}))
        training = dict(training)
        if test_region is not None:
            training["test_input"] = test_region.read()[0]
        return str(export_bioimageio(self.adapter, out, training=training, **metadata))

    def progress(self) -> dict[str, Any]:
        return dict(self._progress)

    def stop(self) -> None:
        self._stop.set()

    def ping(self) -> int:
        return os.getpid()


def start_ray(address: str | None = None, num_cpus: int | None = None) -> dict[str, float]:
    """Join ``address`` ("auto", "host:port", "ray://host:10001") or start an embedded local Ray (no
    dashboard, quiet logs, listeners on loopback); returns the cluster's resources."""
    # Ray swaps 127.0.0.1 for the machine's address (and listens on every interface) unless this variable is 0
    # when ray is imported; it may have been imported already, so its constant is set too.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray._private import ray_constants

    if not ray.is_initialized():
        if address is None:
            ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false")
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
        else:
            try:
                ray.init(address=address, logging_level=logging.WARNING)
            except Exception as e:
                raise BioadaptError(f"could not join the Ray cluster at {address!r}: {e}. Check the address and "
                                    "that RAY_AUTH_MODE / the auth token match the cluster's") from e
    return dict(ray.cluster_resources())


def actor_options(kind: str, gpu_fraction: float = 0.5, threads: int = WORKER_THREADS) -> dict[str, Any]:
    """Ray resources of one actor: a GPU fraction when the cluster has GPUs (a whole GPU to fine-tune), else
    ``threads`` CPUs (the torch threads it runs; Ray sets OMP_NUM_THREADS to the CPUs asked for). Asking for GPUs
    on a cluster without any would leave the actor pending forever."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus > 0:
        return {"num_gpus": 1.0 if kind == "fine_tune" else gpu_fraction, "num_cpus": threads}
    if gpu_fraction and kind == "score":
        log.info("no GPU in the Ray cluster: model actors run on CPUs")
    return {"num_cpus": threads}


def _threads(options: dict[str, Any] | None) -> int:
    return int((options or {}).get("threads") or WORKER_THREADS)


def pool_size(requested: int | None, gpu_fraction: float = 0.5) -> int:
    """Actors a scoring job gets: what the cluster holds (GPUs / fraction, else CPUs), capped by the job."""
    import ray

    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    fits = int(gpus / gpu_fraction) if gpus > 0 else int(resources.get("CPU", 1))
    return max(1, min(fits, requested or fits))


def make_actor(source: str | bytes, options: dict[str, Any] | None, kind: str = "score", gpu_fraction: float = 0.5,
               weights: str | None = None):
    """A model actor (threaded, so stop() and progress() answer while it works); restarted by Ray up to twice
    when its process dies."""
    return _remote(ModelWorker, max_concurrency=2, max_restarts=2, max_task_retries=0).options(
        **actor_options(kind, gpu_fraction, _threads(options))).remote(source, options, weights)



def _worker_call(source: str | bytes, options: dict[str, Any] | None, weights: str | None, method: str,
                 *args: Any) -> Any:
    return getattr(ModelWorker(source, options, weights), method)(*args)


@functools.cache
def _remote(target: Any, **options: Any) -> Any:
    """``ray.remote(**options)(target)``, made once: every new wrapper is exported to the cluster again."""
    import ray

    return ray.remote(**options)(target)


def run_on_worker(source: str | bytes, options: dict[str, Any] | None, weights: str | None, method: str,
                  *args: Any, timeout: float | None = None) -> Any:
    """One short piece of model work (describe, evaluate, predict, export) as a Ray task: the model is loaded
    in a worker process, never in the service's. Errors come back as BioadaptError with the worker's cause."""
    import ray

    task = _remote(_worker_call, max_retries=0).options(**actor_options("task", threads=_threads(options)))
    try:
        return ray.get(task.remote(source, options, weights, method, *args), timeout=timeout)
    except ray.exceptions.GetTimeoutError as e:
        raise BioadaptError(f"{method} took longer than {timeout} s on the Ray worker") from e
    except ray.exceptions.RayError as e:
        raise BioadaptError(remote_cause(e)) from e


def remote_cause(error: Exception) -> str:
    """The user-facing message of a Ray error: the remote traceback's last exception line and what follows it
    (pydantic and others write several lines), without the class name when it is our own BioadaptError."""
    lines = str(error).strip().splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"^\s*[\w.]*(Error|Exception): ", line)]
    if not starts:
        return (lines or [type(error).__name__])[-1][:2000]
    text = "\n".join(line.rstrip() for line in lines[starts[-1]:]).strip()
    return re.sub(r"^(bioadapt\.errors\.)?BioadaptError: ", "", text)[:2000]
