"""Jobs: scoring sharded over a pool of model actors and fine-tuning on one, with progress, cancel, retries,
and a persistent record (SQLAlchemy; SQLite by default) that a restarted service reads back."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from bioadapt.errors import BioadaptError
from bioadapt.service.db import jobs as _jobs
from bioadapt.service.db import make_engine
from bioadapt.service.execution import FineTuneRequest, ScoreRequest, make_actor, pool_size, remote_cause


@dataclass
class Job:
    id: str
    kind: str
    state: str = "queued"
    progress: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    project_id: str | None = None
    owner: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class JobStore:
    """Job records in the service's database (``engine``), or in a SQLite file (WAL) at ``path``."""

    def __init__(self, path: str | Path | None = None, database_url: str | None = None, *,
                 engine: Engine | None = None):
        self.engine = engine or make_engine(path or "bioadapt-jobs.sqlite", database_url)

    def save(self, job: Job) -> None:
        row = {"id": job.id, "kind": job.kind, "state": job.state, "progress": json.dumps(job.progress),
               "result": json.dumps(job.result), "error": job.error, "created": job.created,
               "started": job.started, "finished": job.finished, "project_id": job.project_id, "owner": job.owner}
        with self.engine.begin() as conn:
            if conn.execute(select(_jobs.c.id).where(_jobs.c.id == job.id)).first():
                conn.execute(_jobs.update().where(_jobs.c.id == job.id).values(**row))
            else:
                conn.execute(_jobs.insert().values(**row))

    def update(self, job: Job) -> bool:
        """Write a job's new state over its record; False (and nothing written) when the record is gone (its
        project was deleted): a job never comes back after its project's deletion."""
        row = {"state": job.state, "progress": json.dumps(job.progress), "result": json.dumps(job.result),
               "error": job.error, "started": job.started, "finished": job.finished}
        with self.engine.begin() as conn:
            return conn.execute(_jobs.update().where(_jobs.c.id == job.id).values(**row)).rowcount > 0

    def get(self, job_id: str) -> Job:
        with self.engine.connect() as conn:
            row = conn.execute(select(_jobs).where(_jobs.c.id == job_id)).mappings().first()
        if row is None:
            raise BioadaptError(f"no job {job_id!r}")
        return _job(row)

    def list(self, project_id: str | None = None, owner: str | None = None) -> list[Job]:
        query = select(_jobs).order_by(_jobs.c.created)
        if project_id is not None:
            query = query.where(_jobs.c.project_id == project_id)
        if owner is not None:
            query = query.where(_jobs.c.owner == owner)
        with self.engine.connect() as conn:
            return [_job(row) for row in conn.execute(query).mappings()]

    def mark_interrupted(self) -> int:
        """Jobs left queued or running by a previous service process: failed, with that reason."""
        count = 0
        for job in self.list():
            if job.state in ("queued", "running"):
                job.state, job.error, job.finished = "failed", "interrupted: the service restarted", time.time()
                self.save(job)
                count += 1
        return count


def _job(row: Any) -> Job:
    return Job(id=row["id"], kind=row["kind"], state=row["state"], progress=json.loads(row["progress"]),
               result=json.loads(row["result"]), error=row["error"], created=row["created"], started=row["started"],
               finished=row["finished"], project_id=row["project_id"], owner=row["owner"])


class JobRunner:
    """Runs one job in a thread; ``cancel()`` asks it to stop."""

    def __init__(self, store: JobStore, kind: str, work: Callable[[JobRunner], Any], *,
                 project_id: str | None = None, owner: str | None = None,
                 on_result: Callable[[Any, str], Any] | None = None, progress: Callable[[dict], Any] | None = None):
        self.store = store
        self.job = Job(id=uuid.uuid4().hex[:12], kind=kind, project_id=project_id, owner=owner)
        self._on_result = on_result  # (result, job id) -> the result to keep; in the job thread, before "done"
        self._progress_callback = progress
        self.cancelled = threading.Event()
        self._work = work
        self.actors: list[Any] = []  # the job's Ray actors while it runs (for inspection and tests)
        store.save(self.job)
        self.thread = threading.Thread(target=self._run, name=f"bioadapt-{kind}-{self.job.id}", daemon=True)
        self.thread.start()

    def report(self, **progress: Any) -> None:
        self.job.progress.update(progress)
        self.store.update(self.job)
        if self._progress_callback is not None:
            try:
                self._progress_callback({"job_id": self.job.id, "state": self.job.state, **self.job.progress})
            except Exception:  # a caller that went away must not fail the job
                self._progress_callback = None

    def cancel(self) -> None:
        self.cancelled.set()

    def wait(self, timeout: float | None = None) -> Job:
        self.thread.join(timeout)
        return self.store.get(self.job.id)

    def _run(self) -> None:
        self.job.state, self.job.started = "running", time.time()
        self.store.update(self.job)
        try:
            result = self._work(self)
            if self._on_result is not None:
                result = self._on_result(result, self.job.id)
            self.job.result = result
            self.job.state = "cancelled" if self.cancelled.is_set() else "done"
        except Exception as e:  # the job fails with its cause; the service stays up
            self.job.state, self.job.error = "failed", f"{type(e).__name__}: {e}"
        self.job.finished = time.time()
        self.report()


def score_job(store: JobStore, source: str | bytes, options: dict[str, Any], request: ScoreRequest,
              patches: Sequence[tuple[int, Sequence[int]]], *, actors: int | None = None, shard_size: int = 32,
              retries: int = 2, gpu_fraction: float = 0.5, weights: str | None = None,
              on_shard: Callable[[list[dict[str, Any]]], Any] | None = None, **job: Any) -> JobRunner:
    """Score ``patches`` ((id, origin) pairs) on a pool of model actors; the result is ranked by score.
    ``weights``: a saved state dict to load over the source's; ``on_shard`` receives each finished shard's
    results (in the job's thread, e.g. to commit them); ``job``: JobRunner's keywords."""

    def work(runner: JobRunner) -> list[dict[str, Any]]:
        return run_score(runner, source, options, request, patches, actors=actors, shard_size=shard_size,
                         retries=retries, gpu_fraction=gpu_fraction, weights=weights, on_shard=on_shard)

    return JobRunner(store, "score", work, **job)


def run_score(runner: JobRunner, source: str | bytes, options: dict[str, Any], request: ScoreRequest,
              patches: Sequence[tuple[int, Sequence[int]]], *, actors: int | None = None, shard_size: int = 32,
              retries: int = 2, gpu_fraction: float = 0.5, weights: str | None = None,
              on_shard: Callable[[list[dict[str, Any]]], Any] | None = None, done_before: int = 0,
              total: int | None = None) -> list[dict[str, Any]]:
    """The body of a score job (also one step of a job that scores several images: ``done_before`` and
    ``total`` count patches across them)."""
    import ray

    total = total or len(patches)
    if not patches:
        return []
    shards = [list(patches[i:i + shard_size]) for i in range(0, len(patches), shard_size)]
    pool = [make_actor(source, options, "score", gpu_fraction, weights=weights)
            for _ in range(min(pool_size(actors, gpu_fraction), len(shards)))]
    runner.actors = pool
    try:
        ray.get([a.ping.remote() for a in pool])
    except ray.exceptions.RayActorError as e:
        for actor in pool:
            ray.kill(actor)
        raise BioadaptError(f"model actors could not start: {remote_cause(e)}") from e
    pending = list(range(len(shards)))
    attempts = [0] * len(shards)
    in_flight: dict[Any, tuple[int, Any]] = {}
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    runner.report(done=done_before, total=total)
    try:
        while (pending or in_flight) and not runner.cancelled.is_set():
            busy = {actor for _, actor in in_flight.values()}
            for actor in pool:  # bounded: one shard in flight per actor
                if pending and actor not in busy:
                    shard = pending.pop(0)
                    in_flight[actor.score.remote(request, shards[shard])] = (shard, actor)
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
            for ref in ready:
                shard, actor = in_flight.pop(ref)
                try:
                    shard_results = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                    # the actor died: Ray restarts it (up to twice); retry the shard once it answers again
                    attempts[shard] += 1
                    if attempts[shard] > retries:
                        raise BioadaptError(f"shard {shard} failed {attempts[shard]} times; last cause: "
                                            f"{remote_cause(e)}") from e
                    pending.insert(0, shard)
                    if not _wait_until_alive(actor):
                        pool.remove(actor)
                        if not pool:
                            raise BioadaptError(f"every model actor died; last cause: {remote_cause(e)}") from e
                    continue
                except ray.exceptions.RayTaskError as e:
                    raise BioadaptError(f"scoring failed: {remote_cause(e)}") from e
                results.extend(shard_results)
                if on_shard is not None:
                    on_shard(shard_results)
                runner.report(done=done_before + len(results), total=total,
                              patches_per_second=round(len(results) / (time.perf_counter() - started), 3))
        if runner.cancelled.is_set():
            for actor in pool:
                actor.stop.remote()
    finally:
        for actor in pool:
            ray.kill(actor)
    return sorted(results, key=lambda r: -r["score"])


def fine_tune_job(store: JobStore, source: str | bytes, options: dict[str, Any], request: FineTuneRequest,
                  versions: str | Path, *, weights: str | None = None, target: str | Path | None = None,
                  **job: Any) -> JobRunner:
    """Fine-tune on one actor (a whole GPU when there is one), starting from ``weights`` when given; the new
    weights become a new file ``target`` (default: the next v<N>.pt in ``versions``); earlier versions are
    never touched."""

    def work(runner: JobRunner) -> dict[str, Any]:
        import ray

        actor = make_actor(source, options, "fine_tune", weights=weights)
        runner.actors = [actor]
        try:
            ref = actor.fine_tune.remote(request)
            while True:
                ready, _ = ray.wait([ref], timeout=0.5)
                if ready:
                    break
                if runner.cancelled.is_set():
                    actor.stop.remote()
                runner.report(**ray.get(actor.progress.remote()))
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as e:
                raise BioadaptError(f"fine-tuning failed: {remote_cause(e)}") from e
            runner.report(**ray.get(actor.progress.remote()))  # the last epoch, also when training took < 0.5 s
            if runner.cancelled.is_set():
                return {"result": outcome["result"], "version": None}
            path = Path(target) if target is not None else _next_version_file(Path(versions))
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            partial.write_bytes(outcome["weights"])
            partial.rename(path)
            return {"result": outcome["result"], "version": str(path)}
        finally:
            ray.kill(actor)

    return JobRunner(store, "fine_tune", work, **job)


def _next_version_file(folder: Path) -> Path:
    numbers = [int(p.stem[1:]) for p in folder.glob("v*.pt") if p.stem[1:].isdigit()]
    return folder / f"v{1 + max(numbers, default=0)}.pt"


def _wait_until_alive(actor: Any, timeout: float = 120) -> bool:
    """True once a restarted actor answers; False when it is gone for good (restarts used up)."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=timeout)
            return True
        except ray.exceptions.ActorDiedError:
            return False
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            time.sleep(0.5)
    return False
