"""What the service's tasks work with, as one object handed to each task's ``submit``: the project store, the job
runner, the model pool, the opened images and stores, the limits and locks, and the checks and look-ups every
task repeats (the caller owns the project, a version is usable, an image belongs to the project). Tasks import
this module, never ``api`` nor each other."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from bioadapt.data import ImageRef, LabelledRegion
from bioadapt.errors import BioadaptError
from bioadapt.service.execution import DEFAULT_ACTOR_IDLE_S, ModelPool, ModelSpec, pool_size
from bioadapt.service.jobs import JobRunner, Jobs
from bioadapt.service.limits import JobQuota, Limits
from bioadapt.service.opened import OpenedCache
from bioadapt.service.paths import PathGuard
from bioadapt.service.store import ProjectStore

DEFAULT_MAX_PATCH_PIXELS = 2048 * 2048


@dataclass(frozen=True)
class Caller:
    id: str
    anonymous: bool = False


class ServiceContext:
    def __init__(self, data_dir: Path, engine: Engine, *, allow_paths: Sequence[str | Path] = (),
                 max_patch_pixels: int = DEFAULT_MAX_PATCH_PIXELS, gpu_fraction: float = 0.5, device: str = "auto",
                 actor_idle_s: float = DEFAULT_ACTOR_IDLE_S, limits: Limits | None = None):
        self.data_dir = data_dir
        self.store = ProjectStore(engine)
        self.jobs = Jobs(engine=engine, on_lapsed=self.store.fail_versions)
        self.guard = PathGuard(allow_paths, private=data_dir)
        self.max_patch_pixels = max_patch_pixels
        self.gpu_fraction = gpu_fraction
        self.device = device
        self.pool = ModelPool(gpu_fraction, idle_s=actor_idle_s)
        self.opened = OpenedCache()
        self.draw_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)  # one draw per project
        self.limits = limits or Limits.from_env()
        self.job_quota = JobQuota(self.limits.jobs, self.running_jobs)

    # -- ownership and look-ups -------------------------------------------------------------------------
    def owned_project(self, caller: Caller, project_id: str) -> dict[str, Any]:
        project = self.store.project(project_id)
        if project is None or project["owner"] != caller.id:
            raise BioadaptError(f"no project {project_id!r}; list_projects shows yours")
        return project

    def version(self, project: dict[str, Any], number: int | None) -> dict[str, Any]:
        """A usable model version of the project (the latest with None)."""
        version = self.store.version(project["id"], number)
        if version is not None and version["state"] in (None, "ready"):
            return version
        why = ""
        if version is not None and version["state"] == "training":
            why = f" yet (job {version['job_id']} is training it)"
        elif version is not None:
            why = f" (its fine-tune, job {version['job_id']}, did not finish)"
        known = [v["number"] for v in self.store.versions(project["id"])]
        raise BioadaptError(f"project {project['id']!r} has no model version {number}{why}; it has {known}")

    def image_row(self, project: dict[str, Any], image_id: str) -> dict[str, Any]:
        image = self.store.image(project["id"], image_id)
        if image is None:
            raise BioadaptError(f"project {project['id']!r} has no image {image_id!r}; get_project lists them")
        return image

    def annotated(self, project: dict[str, Any], split: str) -> list[dict[str, Any]]:
        """The project's annotated patches of one split (train, holdout), oldest annotation first."""
        return self.store.patches(project["id"], status="annotated", split=split, order="annotated")

    def trained_patches(self, project: dict[str, Any], number: int) -> list[dict[str, Any]]:
        """The patches a version's weights were trained on: its own training patches and its ancestors', as each
        fine-tune recorded them when it started (oldest annotation first). Versions written before that record
        existed count the training patches annotated before they were made."""
        ids: set[int] = set()
        legacy_before = None
        for row in self.store.lineage(project["id"], number):
            if row["trained_on"] is not None:
                ids.update(row["trained_on"])
            elif row["number"]:
                legacy_before = max(legacy_before or 0.0, row["created"])
        return [p for p in self.annotated(project, "train")
                if p["id"] in ids or (legacy_before is not None and p["annotated"] <= legacy_before)]

    # -- what workers are sent --------------------------------------------------------------------------
    def model_spec(self, project: dict[str, Any], version: dict[str, Any]) -> ModelSpec:
        return ModelSpec(project["model_source"], {**project["model_options"], "device": self.device},
                         version["path"])

    def pool_size(self, requested: int | None) -> int:
        return pool_size(requested, self.gpu_fraction)

    @staticmethod
    def image_ref(row: dict[str, Any]) -> ImageRef:
        return ImageRef(row["uri"], row["axes"], tuple(row["channels"]) if row["channels"] else None,
                        row.get("storage_options") or {})

    def regions_of(self, project: dict[str, Any], patches: Sequence[dict[str, Any]]) -> list[LabelledRegion]:
        """What a worker needs to read these patches' pixels and labels."""
        rows = {row["id"]: row for row in self.store.images(project["id"])}
        return [LabelledRegion(self.image_ref(rows[p["image_id"]]), rows[p["image_id"]]["labels"],
                               tuple(p["origin"]), tuple(p["shape"])) for p in patches]

    def regions(self, project: dict[str, Any], split: str) -> list[LabelledRegion]:
        return self.regions_of(project, self.annotated(project, split))

    # -- opened images and stores (metadata parsed once) ----------------------------------------------
    def opened_image(self, row: dict[str, Any]) -> Any:
        return self.opened.get(("image", row["project_id"], row["id"]), self.image_ref(row).open)

    def opened_store(self, kind: str, row: dict[str, Any]) -> Any:
        """An image's ``labels``, ``predictions`` or ``uncertainty`` store."""
        from bioadapt.data import LabelStore, UncertaintyStore

        opener = UncertaintyStore.open if kind == "uncertainty" else LabelStore.open
        return self.opened.get((kind, row["project_id"], row[kind]), lambda: opener(row[kind]))

    @staticmethod
    def sampling_mask(image: Any, row: dict[str, Any]) -> Any:
        from bioadapt.data.sampling import resolve_mask

        return resolve_mask(image, row["mask"])

    # -- jobs -------------------------------------------------------------------------------------------
    def start_job(self, kind: str, work: Callable[[JobRunner], Any], caller: Caller, project: dict[str, Any],
                  progress: Callable[[dict], Any] | None) -> JobRunner:
        """Start a task's job, within the caller's limit of jobs running at once."""
        with self.job_quota.reserve(caller.id):
            return self.jobs.start(kind, work, project_id=project["id"], owner=caller.id, progress=progress)

    def running_jobs(self, user: str) -> int:
        return sum(1 for runner in self.jobs.running() if runner.job.owner == user)

    def job_folder(self, project: dict[str, Any], job_id: str) -> Path:
        folder = Path(project["folder"]) / "jobs" / job_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder
