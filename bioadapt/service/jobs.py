"""Jobs: one lifecycle for every long operation (score, fine_tune, evaluate, predict, export). A job has an id,
a state (queued, running, done, failed, cancelled), progress, a result or an error, and a persistent record
(SQLAlchemy; SQLite by default) that a restarted service reads back. What a job does is its task's driver
(``service/tasks/``); this module only runs it."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from bioadapt.errors import BioadaptError
from bioadapt.service.db import jobs as _jobs
from bioadapt.service.db import make_engine

FINISHED = ("done", "failed", "cancelled")


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
    """Runs one job's ``work(runner)`` in a thread: ``report`` records progress (and tells the caller's
    callback), ``cancel()`` asks the work to stop, the work's return value is the job's result. ``on_end(runner)``
    runs once the job's final state is saved."""

    def __init__(self, store: JobStore, kind: str, work: Callable[["JobRunner"], Any], *,
                 project_id: str | None = None, owner: str | None = None,
                 progress: Callable[[dict], Any] | None = None,
                 on_end: Callable[["JobRunner"], Any] | None = None):
        self.store = store
        self.job = Job(id=uuid.uuid4().hex[:12], kind=kind, project_id=project_id, owner=owner)
        self._progress_callback = progress
        self._on_end = on_end
        self.cancelled = threading.Event()
        self._work = work
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
            self.job.result = self._work(self)
            self.job.state = "cancelled" if self.cancelled.is_set() else "done"
        except Exception as e:  # the job fails with its cause; the service stays up
            self.job.state, self.job.error = "failed", f"{type(e).__name__}: {e}"
        self.job.finished = time.time()
        try:
            self.report()
        finally:
            if self._on_end is not None:
                self._on_end(self)


class Jobs(JobStore):
    """The service's jobs: their records (a JobStore), and the runners of the jobs running in this process (each
    one forgotten as soon as it ends)."""

    def __init__(self, path: str | Path | None = None, database_url: str | None = None, *,
                 engine: Engine | None = None):
        super().__init__(path, database_url, engine=engine)
        self._running: dict[str, JobRunner] = {}
        self._lock = threading.Lock()

    def start(self, kind: str, work: Callable[[JobRunner], Any], **job: Any) -> JobRunner:
        """Run ``work`` as a new job (``job``: JobRunner's keywords: project_id, owner, progress)."""
        with self._lock:  # the runner registers before its thread can end and forget it
            runner = JobRunner(self, kind, work, on_end=self._forget, **job)
            self._running[runner.job.id] = runner
        return runner

    def _forget(self, runner: JobRunner) -> None:
        with self._lock:
            self._running.pop(runner.job.id, None)

    def running(self, project_id: str | None = None) -> list[JobRunner]:
        with self._lock:
            return [r for r in self._running.values() if project_id is None or r.job.project_id == project_id]

    def cancel(self, job_id: str) -> bool:
        """Ask a job running here to stop; False when it is not running here (finished, or another process's)."""
        with self._lock:
            runner = self._running.get(job_id)
        if runner is None:
            return False
        runner.cancel()
        return True

    def cancel_all(self, project_id: str | None = None, wait_s: float = 0) -> None:
        runners = self.running(project_id)
        for runner in runners:
            runner.cancel()
        deadline = time.monotonic() + wait_s
        for runner in runners:
            runner.thread.join(max(0.0, deadline - time.monotonic()))
