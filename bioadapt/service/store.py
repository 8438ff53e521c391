"""Projects and what they hold (models, images, patches, model versions) as rows in the service's database.

Arrays live in Zarr under each project's folder; this module only records where, and every change is one
transaction, so a killed service finds everything committed before the kill.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, func, or_, select

from bioadapt.errors import BioadaptError
from bioadapt.service import db

PATCH_STATES = ("pending", "annotated", "skipped")
Window = tuple[Sequence[int], Sequence[int]]  # (origin, shape)
JSON_COLUMNS = {"options", "info", "model_options", "model_info", "channels", "shape", "origin", "scores", "metrics",
                "params", "storage_options", "features", "trained_on"}
READY = or_(db.versions.c.state.is_(None), db.versions.c.state == "ready")  # NULL: a row older than states
# A version becomes the default only when its held-out patches could judge it and did not find it worse; a worse
# or an undecided one (too few held-out patches) is used only when named. NULL: version 0 and older rows.
DEFAULTABLE = or_(db.versions.c.verdict.is_(None), db.versions.c.verdict.in_(("better", "same")))


def _row(row: Any) -> dict[str, Any]:
    return {key: (json.loads(value) if key in JSON_COLUMNS and isinstance(value, str) else value)
            for key, value in dict(row).items()}


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


class ProjectStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    def _all(self, query: Any) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(query).mappings()]

    def _first(self, query: Any) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return _row(row) if row else None

    # -- models ---------------------------------------------------------------------------------------
    def add_model(self, owner: str, source: str, options: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
        row = {"id": _new_id(), "owner": owner, "source": source, "options": json.dumps(options),
               "info": json.dumps(info), "created": time.time()}
        with self.engine.begin() as conn:
            conn.execute(db.models.insert().values(**row))
        return _row(row)

    def models(self, owner: str) -> list[dict[str, Any]]:
        return self._all(select(db.models).where(db.models.c.owner == owner).order_by(db.models.c.created))

    def model(self, model_id: str) -> dict[str, Any] | None:
        return self._first(select(db.models).where(db.models.c.id == model_id))

    # -- projects -------------------------------------------------------------------------------------
    def create_project(self, owner: str, name: str, description: str, model: dict[str, Any], folder: str,
                       holdout_fraction: float) -> dict[str, Any]:
        project_id = _new_id()
        now = time.time()
        row = {"id": project_id, "owner": owner, "name": name, "description": description,
               "model_source": model["source"], "model_options": json.dumps(model["options"]),
               "model_info": json.dumps(model["info"]), "folder": folder.replace("{id}", project_id),
               "holdout_fraction": holdout_fraction, "created": now}
        with self.engine.begin() as conn:
            conn.execute(db.projects.insert().values(**row))
            conn.execute(db.versions.insert().values(project_id=project_id, number=0, parent=None, path=None,
                                                     metrics="{}", params="{}", created=now, state="ready",
                                                     trained_on="[]"))
        return _row(row)

    def projects(self, owner: str) -> list[dict[str, Any]]:
        return self._all(select(db.projects).where(db.projects.c.owner == owner).order_by(db.projects.c.created))

    def project(self, project_id: str) -> dict[str, Any] | None:
        return self._first(select(db.projects).where(db.projects.c.id == project_id))

    def delete_project(self, project_id: str) -> None:
        with self.engine.begin() as conn:
            for table in (db.patches, db.images, db.versions, db.jobs):
                conn.execute(table.delete().where(table.c.project_id == project_id))
            conn.execute(db.projects.delete().where(db.projects.c.id == project_id))

    def counts(self, project_id: str) -> dict[str, int]:
        query = (select(db.patches.c.status, func.count()).where(db.patches.c.project_id == project_id)
                 .group_by(db.patches.c.status))
        with self.engine.connect() as conn:
            found = dict(conn.execute(query).all())
        return {state: int(found.get(state, 0)) for state in PATCH_STATES}

    # -- images ---------------------------------------------------------------------------------------
    def add_image(self, project_id: str, record: dict[str, Any]) -> dict[str, Any]:
        row = {"id": record.get("id") or _new_id(), "project_id": project_id, "created": time.time(),
               **{k: (json.dumps(v) if k in JSON_COLUMNS else v) for k, v in record.items() if k != "id"}}
        with self.engine.begin() as conn:
            conn.execute(db.images.insert().values(**row))
        return _row(row)

    def images(self, project_id: str) -> list[dict[str, Any]]:
        return self._all(select(db.images).where(db.images.c.project_id == project_id)
                         .order_by(db.images.c.created))

    def image(self, project_id: str, image_id: str) -> dict[str, Any] | None:
        return self._first(select(db.images).where(db.images.c.project_id == project_id,
                                                   db.images.c.id == image_id))

    # -- patches --------------------------------------------------------------------------------------
    def add_patches(self, project_id: str, image_id: str, windows: Iterable[Window]) -> list[int]:
        """Store windows of one image as pending patches; their ids, in order."""
        return self.add_drawn(project_id, {image_id: list(windows)})[image_id]

    def add_drawn(self, project_id: str, drawn: Mapping[str, Sequence[Window]], seen: int | None = None
                  ) -> dict[str, list[int | None]]:
        """Store windows drawn for several images of a project in one transaction, under the project's lock, so
        concurrent draws (threads or service replicas) never store overlapping windows. ``seen``: the project's
        last patch id when the windows were drawn (they avoid every patch up to it); a window overlapping a patch
        stored since is not stored. Per image, the new ids in the windows' order, None for each window dropped."""
        from bioadapt.data.windows import windows_overlap  # here: store-only processes stay free of zarr

        now = time.time()
        added: dict[str, list[int | None]] = {}
        with self.engine.begin() as conn:
            db.lock_project(conn, project_id)
            newer: dict[str, list[Window]] = {}
            if seen is not None:
                query = select(db.patches.c.image_id, db.patches.c.origin, db.patches.c.shape).where(
                    db.patches.c.project_id == project_id, db.patches.c.id > seen)
                for image_id, origin, shape in conn.execute(query):
                    newer.setdefault(image_id, []).append((json.loads(origin), json.loads(shape)))
            for image_id, windows in drawn.items():
                keep = [not any(windows_overlap(*w, *other) for other in newer.get(image_id, ())) for w in windows]
                ids = iter(self._insert_patches(conn, project_id, image_id,
                                                [w for w, k in zip(windows, keep) if k], now))
                added[image_id] = [next(ids) if k else None for k in keep]
        return added

    @staticmethod
    def _insert_patches(conn: Connection, project_id: str, image_id: str, windows: Sequence[Window],
                        now: float) -> list[int]:
        if not windows:
            return []
        rows = [{"project_id": project_id, "image_id": image_id, "origin": json.dumps([int(o) for o in origin]),
                 "shape": json.dumps([int(s) for s in shape]), "status": "pending", "scores": "{}", "created": now}
                for origin, shape in windows]
        inserted = conn.execute(db.patches.insert().returning(db.patches.c.id, sort_by_parameter_order=True), rows)
        return [int(i) for i in inserted.scalars()]

    def last_patch_id(self, project_id: str) -> int:
        """The project's highest patch id (0 without patches): what a draw has seen."""
        query = select(func.max(db.patches.c.id)).where(db.patches.c.project_id == project_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one() or 0)

    def record_scores(self, project_id: str, results: Sequence[dict[str, Any]], acquisition: str,
                      version: int) -> None:
        """Store a shard of scoring results (one transaction per shard); a result's ``scores`` (numbers its
        selection reads besides the score) join the patch's scores."""
        now = time.time()
        with self.engine.begin() as conn:
            for result in results:
                where = (db.patches.c.project_id == project_id) & (db.patches.c.id == result["patch_id"])
                scores = conn.execute(select(db.patches.c.scores).where(where)).scalar_one_or_none()
                if scores is None:
                    continue  # the project was deleted while it was being scored
                scores = {**json.loads(scores), acquisition: result["score"], **result.get("scores", {})}
                features = {"features": json.dumps(result["features"])} if "features" in result else {}
                conn.execute(db.patches.update().where(where).values(
                    score=result["score"], scores=json.dumps(scores), objects=result.get("objects"),
                    version=version, scored=now, **features))  # a score without features keeps earlier ones

    def record_features(self, project_id: str, results: Sequence[dict[str, Any]]) -> None:
        """Replace patches' features (``{"patch_id", "features"}`` each), their scores untouched."""
        with self.engine.begin() as conn:
            for result in results:
                conn.execute(db.patches.update().where((db.patches.c.project_id == project_id)
                                                       & (db.patches.c.id == result["patch_id"]))
                             .values(features=json.dumps(result["features"])))

    def set_selection(self, project_id: str, patch_ids: Sequence[int]) -> None:
        """The patches picked for annotation, in order (earlier picks of the project are forgotten)."""
        with self.engine.begin() as conn:
            conn.execute(db.patches.update().where(db.patches.c.project_id == project_id,
                                                   db.patches.c.selection_rank.is_not(None))
                         .values(selection_rank=None))
            for rank, patch_id in enumerate(patch_ids, start=1):
                conn.execute(db.patches.update().where(db.patches.c.project_id == project_id,
                                                       db.patches.c.id == int(patch_id))
                             .values(selection_rank=rank))

    def patches(self, project_id: str, *, order: str = "score", status: str | None = None,
                image_id: str | None = None, split: str | None = None, limit: int | None = None,
                offset: int = 0) -> list[dict[str, Any]]:
        query = select(db.patches).where(db.patches.c.project_id == project_id)
        if status is not None:
            query = query.where(db.patches.c.status == status)
        if image_id is not None:
            query = query.where(db.patches.c.image_id == image_id)
        if split is not None:
            query = query.where(db.patches.c.split == split)
        by_score = (db.patches.c.score.is_(None), db.patches.c.score.desc(), db.patches.c.id)
        ordering = {"selection": (db.patches.c.selection_rank.is_(None), db.patches.c.selection_rank, *by_score),
                    "score": by_score,
                    "id": (db.patches.c.id,), "created": (db.patches.c.created, db.patches.c.id),
                    "annotated": (db.patches.c.annotated, db.patches.c.id)}[order]
        query = query.order_by(*ordering).offset(offset)
        return self._all(query if limit is None else query.limit(limit))

    def patch(self, project_id: str, patch_id: int) -> dict[str, Any] | None:
        return self._first(select(db.patches).where(db.patches.c.project_id == project_id,
                                                    db.patches.c.id == patch_id))

    def mark_annotated(self, project_id: str, patch_id: int, annotator: str, holdout_fraction: float
                       ) -> dict[str, Any]:
        """Mark a patch annotated; its first annotation decides whether it trains or is held out: the k-th
        annotated patch of a project is held out while fewer than floor(k f) are, so a fraction f is spread evenly.
        A patch overlapping one that already has a split takes that split, so no held-out pixel is ever trained on
        (draws never overlap; databases written before they were race-free may hold overlapping patches). Safe
        across processes (service replicas): submissions to one project count their k in turn."""
        from bioadapt.data.windows import windows_overlap

        where = (db.patches.c.project_id == project_id) & (db.patches.c.id == patch_id)
        with self.engine.begin() as conn:
            db.lock_project(conn, project_id)
            patch = conn.execute(select(db.patches.c.split, db.patches.c.image_id, db.patches.c.origin,
                                        db.patches.c.shape).where(where)).first()
            split = patch.split if patch is not None else None
            if patch is not None and split is None:
                window = (json.loads(patch.origin), json.loads(patch.shape))
                decided = conn.execute(select(db.patches.c.split, db.patches.c.origin, db.patches.c.shape).where(
                    db.patches.c.project_id == project_id, db.patches.c.image_id == patch.image_id,
                    db.patches.c.split.is_not(None)))
                split = next((row.split for row in decided
                              if windows_overlap(*window, json.loads(row.origin), json.loads(row.shape))), None)
            if patch is not None and split is None:  # held out while fewer than floor(k f) of k are
                counts = dict(conn.execute(select(db.patches.c.split, func.count()).where(
                    db.patches.c.project_id == project_id, db.patches.c.split.is_not(None))
                    .group_by(db.patches.c.split)).all())
                k = sum(counts.values())
                split = "holdout" if counts.get("holdout", 0) < math.floor((k + 1) * holdout_fraction) else "train"
            conn.execute(db.patches.update().where(where).values(status="annotated", annotator=annotator,
                                                                 annotated=time.time(), split=split))
        return self.patch(project_id, patch_id)

    def set_status(self, project_id: str, patch_id: int, status: str) -> dict[str, Any]:
        if status not in PATCH_STATES:
            raise BioadaptError(f"unknown patch status {status!r}; use one of {PATCH_STATES}")
        with self.engine.begin() as conn:
            conn.execute(db.patches.update().where(db.patches.c.project_id == project_id,
                                                   db.patches.c.id == patch_id).values(status=status))
        return self.patch(project_id, patch_id)

    # -- model versions -------------------------------------------------------------------------------
    def versions(self, project_id: str) -> list[dict[str, Any]]:
        """The project's usable versions (ready: not reserved by a fine-tune still training, nor failed)."""
        return self._all(select(db.versions).where(db.versions.c.project_id == project_id, READY)
                         .order_by(db.versions.c.number))

    def version(self, project_id: str, number: int | None = None) -> dict[str, Any] | None:
        """A version by number, whatever its state and verdict (see ``db.versions``); with ``None`` the project's
        default: the latest ready version its held-out patches judged not worse than its parent (``DEFAULTABLE``)."""
        query = select(db.versions).where(db.versions.c.project_id == project_id)
        if number is None:
            return self._first(query.where(READY, DEFAULTABLE).order_by(db.versions.c.number.desc()).limit(1))
        return self._first(query.where(db.versions.c.number == number))

    def reserve_version(self, project_id: str, parent: int, params: dict[str, Any], trained_on: Sequence[int],
                        job_id: str | None) -> int:
        """The project's next version number, taken under the project's lock (so concurrent fine-tunes, in any
        replica, never get the same one) and recorded as "training" with what it trains on."""
        with self.engine.begin() as conn:
            db.lock_project(conn, project_id)
            last = conn.execute(select(func.max(db.versions.c.number))
                                .where(db.versions.c.project_id == project_id)).scalar_one()
            number = int(last or 0) + 1
            conn.execute(db.versions.insert().values(
                project_id=project_id, number=number, parent=parent, path=None, params=json.dumps(params),
                metrics="{}", job_id=job_id, created=time.time(), state="training",
                trained_on=json.dumps([int(i) for i in trained_on])))
        return number

    def finish_version(self, project_id: str, number: int, path: str, metrics: dict[str, Any],
                       verdict: str | None = None) -> bool:
        """A reserved version ready with its weights and its verdict against its parent; False when it is no longer
        reserved (its project was deleted, or it was failed meanwhile)."""
        where = ((db.versions.c.project_id == project_id) & (db.versions.c.number == number)
                 & (db.versions.c.state == "training"))
        with self.engine.begin() as conn:
            return conn.execute(db.versions.update().where(where).values(
                state="ready", path=path, metrics=json.dumps(metrics), verdict=verdict)).rowcount > 0

    def fail_versions(self, job_ids: Sequence[str]) -> int:
        """Versions still reserved by these (fine-tune) jobs marked failed: never usable. How many."""
        if not job_ids:
            return 0
        with self.engine.begin() as conn:
            return conn.execute(db.versions.update().where(db.versions.c.job_id.in_(list(job_ids)),
                                                           db.versions.c.state == "training")
                                .values(state="failed")).rowcount

    def lineage(self, project_id: str, number: int) -> list[dict[str, Any]]:
        """A version and its ancestors (its parent, the parent's parent, ... version 0), that order."""
        rows = {row["number"]: row for row in self._all(select(db.versions)
                                                        .where(db.versions.c.project_id == project_id))}
        chain, current = [], rows.get(number)
        while current is not None and len(chain) <= len(rows):
            chain.append(current)
            current = rows.get(current["parent"]) if current["parent"] is not None else None
        return chain

    def update_version_metrics(self, project_id: str, number: int, metrics: dict[str, Any]) -> None:
        where = (db.versions.c.project_id == project_id) & (db.versions.c.number == number)
        with self.engine.begin() as conn:
            current = conn.execute(select(db.versions.c.metrics).where(where)).scalar_one_or_none()
            if current is not None:
                conn.execute(db.versions.update().where(where).values(
                    metrics=json.dumps({**json.loads(current), **metrics})))
