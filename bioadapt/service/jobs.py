"""Jobs: one lifecycle for every long operation (score, fine_tune, evaluate, predict, export). A job has an id,
a state (queued, running, done, failed, cancelled), progress, a result or an error, and a persistent record
(SQLAlchemy; SQLite by default) that a restarted service reads back. What a job does is its task's driver
(``service/tasks/``); this module only runs it.

A job belongs to the replica (service process) running it, which holds a lease on its record and renews it
every few seconds. A job whose lease ran out is failed ("interrupted: the replica running it stopped") by the
first replica or reader that sees it: a replica starting next to live ones leaves their jobs alone."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, or_, select

from bioadapt.errors import BioadaptError
from bioadapt.service.db import jobs as _jobs
from bioadapt.service.db import make_engine

log = logging.getLogger(__name__)
FINISHED = ("done", "failed", "cancelled")
LIVE = ("queued", "running")
INTERRUPTED = "interrupted: the replica running it stopped"
LEASE_VARIABLE, RENEW_VARIABLE = "BIOADAPT_JOB_LEASE_S", "BIOADAPT_JOB_RENEW_S"


@dataclass(frozen=True)
class Lease:
    """How long a job's record stays its replica's without a renewal (``lease_s``), and how often the replica
    renews it (``renew_s``). A replica stalled for longer than the lease loses its jobs."""

    lease_s: float = 30.0
    renew_s: float = 5.0  # a sixth of the lease: a replica misses five renewals before it loses its jobs

    @classmethod
    def from_env(cls) -> "Lease":
        """From $BIOADAPT_JOB_LEASE_S and $BIOADAPT_JOB_RENEW_S (default: a sixth of the lease) where set."""
        lease_s = float(os.environ.get(LEASE_VARIABLE, cls.lease_s))
        renew_s = float(os.environ.get(RENEW_VARIABLE, lease_s / 6))
        if not 0 < renew_s < lease_s:
            raise BioadaptError(f"a job lease of {lease_s} s renewed every {renew_s} s cannot hold: set "
                                f"${RENEW_VARIABLE} below ${LEASE_VARIABLE}, both above 0")
        return cls(lease_s, renew_s)


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
    replica: str | None = None  # the service process running it
    lease_until: float | None = None  # its replica's lease on it (time.time()); None: lapsed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class JobStore:
    """Job records in the service's database (``engine``), or in a SQLite file (WAL) at ``path``. ``replica``: the
    id this process's jobs are recorded under; ``on_lapsed(job_ids)`` is told of the jobs failed for a lapsed
    lease (their tasks' leftovers, such as a reserved model version, are given up there)."""

    def __init__(self, path: str | Path | None = None, database_url: str | None = None, *,
                 engine: Engine | None = None, lease: Lease | None = None,
                 on_lapsed: Callable[[list[str]], Any] | None = None):
        self.engine = engine or make_engine(path or "bioadapt-jobs.sqlite", database_url)
        self.lease = lease or Lease.from_env()
        self.replica = uuid.uuid4().hex[:12]
        self.on_lapsed = on_lapsed

    def save(self, job: Job) -> None:
        row = {"id": job.id, "kind": job.kind, "state": job.state, "progress": json.dumps(job.progress),
               "result": json.dumps(job.result), "error": job.error, "created": job.created,
               "started": job.started, "finished": job.finished, "project_id": job.project_id, "owner": job.owner,
               "replica": job.replica, "lease_until": job.lease_until}
        with self.engine.begin() as conn:
            if conn.execute(select(_jobs.c.id).where(_jobs.c.id == job.id)).first():
                conn.execute(_jobs.update().where(_jobs.c.id == job.id).values(**row))
            else:
                conn.execute(_jobs.insert().values(**row))

    def update(self, job: Job) -> bool:
        """Write a running job's new state over its record, renewing its lease; False (and nothing written) when
        the record is gone (its project was deleted) or already ended (failed for a lapsed lease): a job never
        comes back after that."""
        if job.state in LIVE:
            job.lease_until = time.time() + self.lease.lease_s
        row = {"state": job.state, "progress": json.dumps(job.progress), "result": json.dumps(job.result),
               "error": job.error, "started": job.started, "finished": job.finished, "lease_until": job.lease_until}
        with self.engine.begin() as conn:
            return conn.execute(_jobs.update().where(_jobs.c.id == job.id, _jobs.c.state.in_(LIVE))
                                .values(**row)).rowcount > 0

    def get(self, job_id: str) -> Job:
        """A job's record; one whose lease lapsed is failed first, so every reader sees how it ended."""
        job = self._get(job_id)
        if job.state in LIVE and _lapsed(job.lease_until):
            self.fail_lapsed([job_id])
            job = self._get(job_id)
        return job

    def _get(self, job_id: str) -> Job:
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
        found = self._all(query)
        lapsed = [job.id for job in found if job.state in LIVE and _lapsed(job.lease_until)]
        if lapsed:
            self.fail_lapsed(lapsed)
            found = self._all(query)
        return found

    def _all(self, query: Any) -> list[Job]:
        with self.engine.connect() as conn:
            return [_job(row) for row in conn.execute(query).mappings()]

    def fail_lapsed(self, job_ids: list[str] | None = None) -> list[str]:
        """Queued or running jobs (of ``job_ids``, or all) whose lease lapsed, or that have none (records written
        before leases existed): failed, their replica gone. Their ids."""
        now = time.time()
        where = [_jobs.c.state.in_(LIVE), or_(_jobs.c.lease_until.is_(None), _jobs.c.lease_until < now)]
        if job_ids is not None:
            where.append(_jobs.c.id.in_(job_ids))
        with self.engine.begin() as conn:
            failed = list(conn.execute(_jobs.update().where(*where).values(state="failed", error=INTERRUPTED,
                                                                           finished=now)
                                       .returning(_jobs.c.id)).scalars())
        if failed and self.on_lapsed is not None:
            self.on_lapsed(failed)
        return failed

    def renew(self, job_ids: list[str]) -> set[str]:
        """Extend this replica's lease on its live jobs; the ids whose record is still live (the others were
        deleted with their project, or failed by another replica that saw their lease lapse)."""
        if not job_ids:
            return set()
        with self.engine.begin() as conn:
            return set(conn.execute(_jobs.update().where(_jobs.c.id.in_(job_ids), _jobs.c.state.in_(LIVE))
                                    .values(lease_until=time.time() + self.lease.lease_s)
                                    .returning(_jobs.c.id)).scalars())


def _lapsed(lease_until: float | None) -> bool:
    return lease_until is None or lease_until < time.time()


def _job(row: Any) -> Job:
    return Job(id=row["id"], kind=row["kind"], state=row["state"], progress=json.loads(row["progress"]),
               result=json.loads(row["result"]), error=row["error"], created=row["created"], started=row["started"],
               finished=row["finished"], project_id=row["project_id"], owner=row["owner"], replica=row["replica"],
               lease_until=row["lease_until"])


class JobRunner:
    """Runs one job's ``work(runner)`` in a thread: ``report`` records progress (and tells the caller's
    callback), ``cancel()`` asks the work to stop, the work's return value is the job's result. ``on_end(runner)``
    runs once the job's final state is saved."""

    def __init__(self, store: JobStore, kind: str, work: Callable[["JobRunner"], Any], *,
                 project_id: str | None = None, owner: str | None = None,
                 progress: Callable[[dict], Any] | None = None,
                 on_end: Callable[["JobRunner"], Any] | None = None):
        self.store = store
        self.job = Job(id=uuid.uuid4().hex[:12], kind=kind, project_id=project_id, owner=owner,
                       replica=store.replica, lease_until=time.time() + store.lease.lease_s)
        self._progress_callback = progress
        self._on_end = on_end
        self.cancelled = threading.Event()
        self._work = work
        store.save(self.job)
        self.thread = threading.Thread(target=self._run, name=f"bioadapt-{kind}-{self.job.id}", daemon=True)
        self.thread.start()

    def report(self, **progress: Any) -> None:
        self.job.progress.update(progress)
        if not self.store.update(self.job):
            self.cancelled.set()  # its record is gone or ended elsewhere: nothing it does is kept now
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
        if not self.store.update(self.job):
            self.cancelled.set()
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
    """The service's jobs: their records (a JobStore), the runners of the jobs running in this process (each one
    forgotten as soon as it ends), and a heartbeat thread that renews their leases and fails other replicas' lapsed
    jobs, every ``lease.renew_s``."""

    def __init__(self, path: str | Path | None = None, database_url: str | None = None, *,
                 engine: Engine | None = None, lease: Lease | None = None,
                 on_lapsed: Callable[[list[str]], Any] | None = None):
        super().__init__(path, database_url, engine=engine, lease=lease, on_lapsed=on_lapsed)
        self._running: dict[str, JobRunner] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="bioadapt-job-leases", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._closed.wait(self.lease.renew_s):
            try:
                runners = self.running()
                live = self.renew([runner.job.id for runner in runners])
                for runner in runners:
                    if runner.job.id not in live:  # deleted with its project, or failed by another replica
                        runner.cancel()
                self.fail_lapsed()
            except Exception:  # the database may be out of reach for a moment: the next beat tries again
                log.warning("renewing the job leases failed", exc_info=True)

    def close(self) -> None:
        """Stop renewing leases (the jobs still running here lapse after the lease)."""
        self._closed.set()
        self._heartbeat.join(timeout=10)

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
