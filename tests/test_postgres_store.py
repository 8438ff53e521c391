"""The project store on both backends it supports: SQLite (one service) and PostgreSQL (several replicas).

The story: a service writes projects, patches, labels, model versions and jobs, is dropped and restarted on the
same database and finds everything; several service processes submit labels to one project at the same time and
the train / hold-out split stays exact; several replicas start on an empty database at once.

PostgreSQL is a real server started for this module (``postgres_helpers.postgres_server``); the PostgreSQL
cases are skipped, with the reason, when its binaries or the psycopg driver are missing.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from pathlib import Path

import pytest
import store_workers
from postgres_helpers import postgres_server  # noqa: F401  (a fixture)

from bioadapt.errors import AccessDenied, BioadaptError
from bioadapt.service import schemas as s
from bioadapt.service.api import BioadaptService, Caller
from bioadapt.service.db import make_engine
from bioadapt.service.jobs import INTERRUPTED, Job
from bioadapt.service.store import ProjectStore

BACKENDS = ["sqlite", "postgresql"]
RESTART_REASON = INTERRUPTED


@pytest.fixture(params=BACKENDS)
def database_url(request, tmp_path) -> str:
    """A fresh, empty database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite'}"
    return request.getfixturevalue("postgres_server")()


# -- helpers ----------------------------------------------------------------------------------------------
def new_project(store: ProjectStore, folder: Path, holdout_fraction: float, n_patches: int) -> tuple[dict, list[int]]:
    model = store.add_model("alice", "cellpose:cyto3", {"dropout_p": 0.05},
                            {"axes": "cyx", "input_channels": 1, "output": "cellpose"})
    project = store.create_project("alice", "nuclei", "round one", model, str(folder / "projects" / "{id}"),
                                   holdout_fraction)
    image = store.add_image(project["id"], {
        "uri": str(folder / "slide.ome.zarr"), "axes": "cyx", "channels": [0], "mask": None,
        "shape": [1, 512, 512], "spatial_axes": "yx", "labels": str(folder / "labels.ome.zarr"),
        "predictions": str(folder / "predictions.ome.zarr"), "uncertainty": str(folder / "uncertainty.zarr")})
    windows = [((32 * (i // 16), 32 * (i % 16)), (32, 32)) for i in range(n_patches)]
    return project, store.add_patches(project["id"], image["id"], windows)


def snapshot(service: BioadaptService, project_id: str) -> dict:
    """Everything the store holds about alice's work, read back through the store."""
    store = service.store
    return {"models": store.models("alice"), "projects": store.projects("alice"),
            "images": store.images(project_id), "patches": store.patches(project_id, order="id"),
            "ranked": [p["id"] for p in store.patches(project_id)], "versions": store.versions(project_id),
            "counts": store.counts(project_id),
            "holdout": [p["id"] for p in store.patches(project_id, split="holdout")]}


def expected_holdout(n_annotated: int, holdout_fraction: float) -> int:
    return math.floor(n_annotated * holdout_fraction)


# -- (a) restart safety -----------------------------------------------------------------------------------
def test_a_restarted_service_finds_everything_and_fails_its_unfinished_jobs(database_url, tmp_path):
    alice = Caller("alice")
    service = BioadaptService(tmp_path / "data", database_url=database_url)
    project, ids = new_project(service.store, tmp_path, holdout_fraction=0.5, n_patches=6)
    pid = project["id"]
    service.store.record_scores(pid, [{"patch_id": i, "score": 0.1 * n, "objects": n} for n, i in enumerate(ids[:5])],
                                "bald", 0)
    for patch_id in ids[:4]:
        service.store.mark_annotated(pid, patch_id, "alice", project["holdout_fraction"])
    service.store.set_status(pid, ids[5], "skipped")
    assert service.store.reserve_version(pid, 0, {"epochs": 3}, ids[:2], "tune-0") == 1
    assert service.store.finish_version(pid, 1, str(tmp_path / "v1.pt"), {"training": {"loss": 0.25}})
    assert service.store.reserve_version(pid, 1, {"epochs": 3}, ids[:2], "tune-1") == 2  # still training
    service.store.update_version_metrics(pid, 1, {"holdout": {"f1": 0.75}})
    service.jobs.save(Job(id="score-1", kind="score", state="done", result={"scored": 5}, project_id=pid,
                          owner="alice", started=time.time(), finished=time.time()))
    service.jobs.save(Job(id="tune-1", kind="fine_tune", state="running", progress={"epoch": 2, "loss": 0.3},
                          project_id=pid, owner="alice", started=time.time()))
    service.jobs.save(Job(id="score-2", kind="score", state="queued", project_id=pid, owner="alice"))
    service.jobs.save(Job(id="live-1", kind="score", state="running", project_id=pid, owner="alice",
                          replica="another live replica", lease_until=time.time() + 600))
    before = snapshot(service, pid)
    assert before["counts"] == {"pending": 1, "annotated": 4, "skipped": 1}
    assert len(before["holdout"]) == expected_holdout(4, 0.5)
    service.jobs.close()
    service.engine.dispose()
    del service

    restarted = BioadaptService(tmp_path / "data", database_url=database_url)
    try:
        assert restarted.interrupted == 2
        assert snapshot(restarted, pid) == before
        jobs = {job.id: job for job in restarted.jobs.list(project_id=pid)}
        assert jobs["score-1"].state == "done" and jobs["score-1"].result == {"scored": 5}
        for job_id in ("tune-1", "score-2"):
            assert jobs[job_id].state == "failed" and jobs[job_id].error == RESTART_REASON
            assert jobs[job_id].finished is not None
        assert jobs["tune-1"].progress == {"epoch": 2, "loss": 0.3}
        assert jobs["live-1"].state == "running"  # its replica renews its lease: not this one's to fail
        assert restarted.jobs.fail_lapsed() == []
        assert restarted.store.version(pid, 2)["state"] == "failed"  # reserved by the interrupted fine-tune

        # the service's own functions see the same project, and only alice does
        shown = restarted.get_project(alice, s.GetProject(project_id=pid))
        assert [v["number"] for v in shown["versions"]] == [0, 1]
        assert shown["versions"][1]["metrics"] == {"training": {"loss": 0.25}, "holdout": {"f1": 0.75}}
        assert restarted.job_status(alice, s.JobStatus(job_id="tune-1"))["error"] == RESTART_REASON
        with pytest.raises(BioadaptError, match=f"no project '{pid}'") as refused:  # as if it did not exist
            restarted.get_project(Caller("bob"), s.GetProject(project_id=pid))
        assert not isinstance(refused.value, AccessDenied)

        # a patch annotated again keeps the split its first annotation gave it
        first = before["patches"][0]
        again = restarted.store.mark_annotated(pid, first["id"], "alice", 0.5)
        assert again["split"] == first["split"] and again["annotator"] == "alice"
    finally:
        restarted.jobs.close()
        restarted.engine.dispose()


# -- (b) labels from several service processes at once ----------------------------------------------------
@pytest.mark.parametrize("holdout_fraction", [0.25, 0.3])
def test_b_labels_from_several_processes_keep_the_split_exact(database_url, tmp_path, holdout_fraction):
    n_processes, per_process = 4, 6
    engine = make_engine(database_url=database_url)
    store = ProjectStore(engine)
    project, ids = new_project(store, tmp_path, holdout_fraction, n_patches=n_processes * per_process)
    context = multiprocessing.get_context("spawn")  # each a fresh interpreter, like separate replicas
    start = context.Barrier(n_processes)
    workers = [context.Process(target=store_workers.label_patches,
                               args=(database_url, project["id"], ids[i::n_processes], holdout_fraction, start))
               for i in range(n_processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    try:
        assert [w.exitcode for w in workers] == [0] * n_processes, "a labelling process failed (its stderr above)"
        annotated = store.patches(project["id"], status="annotated", order="annotated")
        assert sorted(p["id"] for p in annotated) == sorted(ids)
        assert len({p["annotator"] for p in annotated}) == n_processes
        holdout = [p for p in annotated if p["split"] == "holdout"]
        train = [p for p in annotated if p["split"] == "train"]
        assert len(holdout) == expected_holdout(len(ids), holdout_fraction), (len(holdout), len(train))
        assert len(holdout) + len(train) == len(ids)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        engine.dispose()


# -- (e) draws from several replicas at once ----------------------------------------------------------------
def _overlap(a: dict, b: dict) -> bool:
    return all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a["origin"], a["shape"], b["origin"],
                                                                         b["shape"]))


def test_e_replicas_drawing_at_once_never_store_overlapping_windows(database_url, tmp_path):
    """4 replicas store 16 windows each for one image at the same moment, each drawn before any was stored (so
    each overlaps the others'): what ends up stored never overlaps, and the first draw is stored whole."""
    n_processes = 4
    engine = make_engine(database_url=database_url)
    store = ProjectStore(engine)
    project, _ = new_project(store, tmp_path, 0.25, n_patches=0)
    image_id = store.images(project["id"])[0]["id"]
    draws = [[((32 * (i // 4) + 8 * k, 32 * (i % 4) + 8 * k), (32, 32)) for i in range(16)] for k in range(n_processes)]
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(n_processes)
    workers = [context.Process(target=store_workers.draw_patches,
                               args=(database_url, project["id"], image_id, draws[k], start))
               for k in range(n_processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    try:
        assert [w.exitcode for w in workers] == [0] * n_processes, "a drawing process failed (its stderr above)"
        stored = store.patches(project["id"], order="id")
        assert len(stored) >= 16
        assert not [(a["origin"], b["origin"]) for i, a in enumerate(stored) for b in stored[i + 1:] if _overlap(a, b)]
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        engine.dispose()


def test_f_overlapping_patches_from_older_databases_share_their_split(database_url, tmp_path):
    """A database written before draws were race-free may hold overlapping patches: annotating them all never puts
    a held-out window over a training one."""
    engine = make_engine(database_url=database_url)
    store = ProjectStore(engine)
    project, ids = new_project(store, tmp_path, 0.5, n_patches=8)
    image_id = store.images(project["id"])[0]["id"]
    twins = store.add_patches(project["id"], image_id, [(p["origin"], p["shape"]) for p in store.patches(
        project["id"], order="id")])  # the same 8 windows again, as two concurrent draws stored them
    try:
        for patch_id in [i for pair in zip(ids, twins) for i in pair]:
            store.mark_annotated(project["id"], patch_id, "alice", 0.5)
        annotated = store.patches(project["id"], status="annotated", order="id")
        held = [p for p in annotated if p["split"] == "holdout"]
        trains = [p for p in annotated if p["split"] == "train"]
        assert held and trains and len(held) + len(trains) == 16
        assert not [(h["id"], t["id"]) for h in held for t in trains if _overlap(h, t)]
    finally:
        engine.dispose()


# -- (c) replicas starting together -----------------------------------------------------------------------
def test_c_replicas_starting_at_once_create_the_tables_once(database_url):
    n_processes = 4
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(n_processes)
    workers = [context.Process(target=store_workers.open_store, args=(database_url, start))
               for _ in range(n_processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * n_processes, "a replica failed to open the store (stderr above)"
    engine = make_engine(database_url=database_url)
    try:
        assert ProjectStore(engine).projects("alice") == []
    finally:
        engine.dispose()


# -- (d) the URLs hosting providers print -------------------------------------------------------------------
def test_d_plain_postgresql_urls_use_psycopg(postgres_server):
    url = postgres_server()
    for scheme in ("postgresql://", "postgres://"):
        engine = make_engine(database_url=url.replace("postgresql+psycopg://", scheme))
        try:
            assert engine.dialect.driver == "psycopg"
            assert ProjectStore(engine).projects("alice") == []
        finally:
            engine.dispose()


# -- (g) databases written by earlier releases ----------------------------------------------------------------
ADDED_COLUMNS = [("versions", "state"), ("versions", "trained_on"), ("jobs", "replica"), ("jobs", "lease_until")]


def test_g_a_database_of_an_earlier_release_keeps_working(database_url, tmp_path):
    """The columns added since are added when a service opens the database; versions written without them are
    usable, and new version numbers follow theirs."""
    from sqlalchemy import inspect

    from bioadapt.service import db

    engine = make_engine(database_url=database_url)
    project, ids = new_project(ProjectStore(engine), tmp_path, 0.25, n_patches=2)
    pid = project["id"]
    with engine.begin() as conn:  # the tables as the earlier release made them, with a version it trained
        for table, column in ADDED_COLUMNS:
            conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.exec_driver_sql(f"INSERT INTO versions (project_id, number, parent, path, metrics, params, job_id, "
                             f"created) VALUES ('{pid}', 1, 0, 'v1.pt', '{{}}', '{{}}', 'tune-1', {time.time()})")
    engine.dispose()
    engine = make_engine(database_url=database_url)  # what a service of this release does when it starts
    try:
        store = ProjectStore(engine)
        assert [(v["number"], v["state"]) for v in store.versions(pid)] == [(0, None), (1, None)]
        assert store.version(pid)["number"] == 1
        assert store.reserve_version(pid, 1, {}, ids[:1], "tune-2") == 2
        for table in db.metadata.sorted_tables:
            assert {c["name"] for c in inspect(engine).get_columns(table.name)} == set(table.columns.keys())
    finally:
        engine.dispose()
