"""The Ray side, and only that: a generic model actor that holds one loaded model and runs any task's worker body
on it, a pool that keeps those actors warm for the next image or task while the weights stay the same, one call
on an actor with progress, cancel and retry, and the cluster's resources.

What the actors run lives with each task (``service/tasks/``); the driver only sends coordinates and paths:
pixels move between Zarr and the actors, never through the service.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bioadapt.errors import BioadaptError
from bioadapt.service.worker_files import use_own_temporary_folder

if TYPE_CHECKING:
    from bioadapt.service.jobs import JobRunner

log = logging.getLogger(__name__)
DEFAULT_ACTOR_IDLE_S = 60.0  # how long an idle model actor stays loaded for the next job on the same model
EVICT_AFTER_S = 30.0  # a new actor pending this long while the cluster is full makes an idle one go

# torch threads (and Ray CPUs) per model actor or task. One: on the 2 busy cores we measured, a fine-tuning
# step took 137 ms with one thread and 1.5 s with two (benchmarks/bench_threads.py, results/threads*.json);
# more actors, not more threads per actor, use more cores. A model's options may set "threads".
WORKER_THREADS = 1


@dataclass(frozen=True)
class ModelSpec:
    """Which model an actor holds: a source (path, URL, zoo id, cellpose:<name>, or a package's bytes), the
    adapter's options, and the weights of a model version loaded over the source's (None: the source's own)."""

    source: str | bytes
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    weights: str | None = None

    @property
    def key(self) -> tuple[str, str, str | None]:
        source = self.source if isinstance(self.source, str) else "sha1:" + hashlib.sha1(self.source).hexdigest()
        return source, json.dumps(self.options, sort_keys=True, default=str), self.weights


def load_model(spec: ModelSpec) -> tuple[Any, tempfile.TemporaryDirectory | None]:
    """The adapter for ``spec`` (and the temporary folder holding a package sent as bytes, to keep alive)."""
    from bioadapt.adapters import load_adapter

    source, folder = spec.source, None
    if isinstance(source, bytes):  # a package sent once through the object store
        folder = tempfile.TemporaryDirectory(prefix="bioadapt-model-")
        path = Path(folder.name) / "model.zip"
        path.write_bytes(source)
        source = str(path)
    try:
        adapter = load_adapter(source, **{"threads": WORKER_THREADS, **spec.options})
    except Exception as e:
        raise BioadaptError(f"worker on {os.uname().nodename} cannot load model {source!r}: {e}") from e
    if spec.weights is not None:
        import torch

        try:
            state = torch.load(spec.weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise BioadaptError(f"worker on {os.uname().nodename} cannot read model weights {spec.weights!r}: {e}. "
                                "On a cluster, the project folder must be on storage every worker reaches") from e
        adapter.load_state_dict(state)
    return adapter, folder


def describe(adapter: Any) -> dict[str, Any]:
    """A worker body: the model's ``describe()`` as plain data."""
    return adapter.describe().to_dict()


class ModelActor:
    """What a model actor runs (a plain class, so it is testable without Ray): the model loaded once, and any
    task's worker body ``body(adapter, *args, stop=Event, progress=callable)`` run on it."""

    def __init__(self, spec: ModelSpec, own_temporary_folder: bool = False):
        if own_temporary_folder:  # a Ray worker process: see worker_files
            use_own_temporary_folder()
        self.adapter, self._folder = load_model(spec)
        self._stop = threading.Event()
        self._progress: dict[str, Any] = {}

    def run(self, body: Callable[..., Any], *args: Any) -> Any:
        self._stop.clear()
        self._progress = {}
        return body(self.adapter, *args, stop=self._stop, progress=self._progress.update)

    def progress(self) -> dict[str, Any]:
        return dict(self._progress)

    def stop(self) -> None:
        self._stop.set()

    def ping(self) -> int:
        return os.getpid()

    def temporary_folder(self) -> str:
        return tempfile.gettempdir()


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
    """Actors a job gets: what the cluster holds (GPUs / fraction, else CPUs), capped by the job."""
    import ray

    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    fits = int(gpus / gpu_fraction) if gpus > 0 else int(resources.get("CPU", 1))
    return max(1, min(fits, requested or fits))


def make_actor(spec: ModelSpec, kind: str = "score", gpu_fraction: float = 0.5) -> Any:
    """A model actor (threaded, so stop() and progress() answer while it works); restarted by Ray up to twice
    when its process dies."""
    return _remote(ModelActor, max_concurrency=2, max_restarts=2, max_task_retries=0).options(
        **actor_options(kind, gpu_fraction, _threads(spec.options))).remote(spec, own_temporary_folder=True)


class ModelPool:
    """Model actors kept warm between jobs: a job leases actors for a model (``ModelSpec``) and gives them back;
    the next job on the same model and weights (another image, another task of the project) gets them without
    loading the model again. Idle actors go after ``idle_s`` seconds, or at once when a new actor waits for room."""

    def __init__(self, gpu_fraction: float = 0.5, idle_s: float = DEFAULT_ACTOR_IDLE_S,
                 evict_after_s: float = EVICT_AFTER_S):
        self.gpu_fraction = gpu_fraction
        self.idle_s = idle_s
        self.evict_after_s = evict_after_s
        self.started = 0  # actors started so far: each loaded its model once
        self._idle: list[tuple[tuple, Any, float]] = []  # (key, actor, idle since), oldest first
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._reap, name="bioadapt-actor-reaper", daemon=True).start()

    def _key(self, spec: ModelSpec, kind: str) -> tuple:
        return spec.key, json.dumps(actor_options(kind, self.gpu_fraction), sort_keys=True)

    def idle(self) -> int:
        with self._lock:
            return len(self._idle)

    def _take(self, key: tuple, n: int) -> list[Any]:
        with self._lock:
            mine = [entry for entry in self._idle if entry[0] == key][-n:] if n > 0 else []
            for entry in mine:
                self._idle.remove(entry)
        return [actor for _, actor, _ in mine]

    def lease(self, spec: ModelSpec, n: int = 1, *, kind: str = "score",
              cancelled: threading.Event | None = None) -> list[Any]:
        """``n`` actors holding ``spec``'s model, ready to run; fewer (maybe none) only when ``cancelled`` is set
        while they start. Idle actors of other models are stopped when the new ones need their room."""
        import ray

        key = self._key(spec, kind)
        ready = self._take(key, n)
        self._make_room(kind, n - len(ready))
        new = [make_actor(spec, kind, self.gpu_fraction) for _ in range(n - len(ready))]
        with self._lock:
            self.started += len(new)
        pending = {actor.ping.remote(): actor for actor in new}
        waiting_since = time.monotonic()
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.5)
                for ref in done:
                    ray.get(ref)
                    ready.append(pending.pop(ref))
                if not pending:
                    break
                if cancelled is not None and cancelled.is_set():
                    for actor in pending.values():
                        ray.kill(actor)
                    return ready
                for actor in self._take(key, len(pending)):  # a job on the same model just finished
                    ray.kill(pending.pop(next(iter(pending))))
                    ready.append(actor)
                if time.monotonic() - waiting_since > self.evict_after_s and self._room(kind) < len(pending):
                    self._evict(count=1)  # room was misjudged (another job gave actors back meanwhile)
                    waiting_since = time.monotonic()
        except ray.exceptions.RayActorError as e:
            for actor in [*ready, *pending.values()]:
                ray.kill(actor)
            raise BioadaptError(f"model actors could not start: {remote_cause(e)}") from e
        return ready

    def _make_room(self, kind: str, count: int) -> None:
        """Stop idle actors (longest idle first) until the cluster has room for ``count`` new ones of ``kind``."""
        import ray

        if count <= 0 or not self.idle():
            return
        room = self._room(kind)
        while room < count and self._evict(count=1):
            room += 1  # an idle actor holds what a new one needs (its resources return a moment after the kill)

    def _room(self, kind: str) -> int:
        """How many more actors of ``kind`` the cluster's free resources hold now."""
        import ray

        available = ray.available_resources()
        need = actor_options(kind, self.gpu_fraction)  # Ray's option names; its resources are "CPU" and "GPU"
        resource = {"num_cpus": "CPU", "num_gpus": "GPU"}
        return min(int(available.get(resource[name], 0) / amount) for name, amount in need.items() if amount)

    def release(self, spec: ModelSpec, actors: list[Any], *, kind: str = "score", healthy: bool = True) -> None:
        """Give leased actors back (idle, for the next job on the same model); unhealthy ones are stopped."""
        import ray

        key = self._key(spec, kind)
        for actor in actors:
            if healthy and not self._closed.is_set():
                with self._lock:
                    self._idle.append((key, actor, time.monotonic()))
            else:
                ray.kill(actor)

    def _evict(self, count: int | None = None, older_than_s: float = 0.0) -> int:
        now = time.monotonic()
        with self._lock:
            old = [entry for entry in self._idle if now - entry[2] >= older_than_s][:count]
            for entry in old:
                self._idle.remove(entry)
        if not old:
            return 0
        import ray

        for _, actor, _ in old:
            ray.kill(actor)
        return len(old)

    def _reap(self) -> None:
        while not self._closed.wait(1.0):
            try:
                self._evict(older_than_s=self.idle_s)
            except Exception:  # Ray shut down under us: nothing left to stop
                log.debug("reaping idle actors failed", exc_info=True)

    def drop(self, specs: list[ModelSpec]) -> int:
        """Stop the idle actors holding one of ``specs`` (a deleted project's versions)."""
        keys = {spec.key for spec in specs}
        with self._lock:
            gone = [entry for entry in self._idle if entry[0][0] in keys]
            for entry in gone:
                self._idle.remove(entry)
        if gone:
            import ray

            for _, actor, _ in gone:
                ray.kill(actor)
        return len(gone)

    def close(self) -> None:
        """Stop every idle actor; actors given back later are stopped too."""
        self._closed.set()
        self._evict()


def run_body(runner: "JobRunner", actor: Any, body: Callable[..., Any], *args: Any, what: str,
             retries: int = 2, poll_s: float = 0.5) -> Any:
    """Run ``body`` on ``actor`` for a job: its progress goes to the job's record, cancelling the job stops it,
    and a call lost with its actor's process is retried (Ray restarts the actor) up to ``retries`` times."""
    import ray

    attempts = 0
    while True:
        ref = actor.run.remote(body, *args)
        try:
            while not ray.wait([ref], timeout=poll_s)[0]:
                if runner.cancelled.is_set():
                    actor.stop.remote()
                runner.report(**ray.get(actor.progress.remote()))
            result = ray.get(ref)
            runner.report(**ray.get(actor.progress.remote()))  # the last report, also when the call took < poll_s
            return result
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            attempts += 1
            if attempts > retries or not wait_until_alive(actor):
                raise BioadaptError(f"{what} failed: the model actor died {attempts} time(s); last cause: "
                                    f"{remote_cause(e)}") from e
            runner.report(retries=attempts)
        except ray.exceptions.RayTaskError as e:
            raise BioadaptError(f"{what} failed: {remote_cause(e)}") from e


def wait_until_alive(actor: Any, timeout_s: float = 120) -> bool:
    """True once a restarted actor answers; False when it is gone for good (restarts used up)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=timeout_s)
            return True
        except ray.exceptions.ActorDiedError:
            return False
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            time.sleep(0.5)
    return False


def _run_once(spec: ModelSpec, body: Callable[..., Any], *args: Any) -> Any:
    use_own_temporary_folder()
    adapter, _folder = load_model(spec)
    return body(adapter, *args)


@functools.cache
def _remote(target: Any, **options: Any) -> Any:
    """``ray.remote(**options)(target)``, made once: every new wrapper is exported to the cluster again."""
    import ray

    return ray.remote(**options)(target)


def run_once(spec: ModelSpec, body: Callable[..., Any], *args: Any, timeout_s: float | None = None) -> Any:
    """``body(adapter, *args)`` in a Ray task of its own (the model is loaded in a worker process, never in the
    service's), for short checks such as ``describe``. Errors come back as BioadaptError with the worker's cause."""
    import ray

    task = _remote(_run_once, max_retries=0).options(**actor_options("task", threads=_threads(spec.options)))
    try:
        return ray.get(task.remote(spec, body, *args), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        raise BioadaptError(f"the model took longer than {timeout_s} s on the Ray worker") from e
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
