"""What each service function does, independent of Hypha: projects owned by their creator, images confined to
allowed roots, arrays kept in Zarr under each project's folder. Quick calls are answered here; every long
operation is a task (``service/tasks/``) run as a job on Ray actors leased from the service's model pool.

Every public method takes the caller first and the validated arguments (``schemas``) second, and is blocking:
the Hypha layer runs it in a thread pool.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bioadapt.data import ImageRef, LabelledRegion
from bioadapt.data.stores import check_reachable, scheme_of
from bioadapt.errors import AccessDenied, BioadaptError
from bioadapt.service import schemas as s
from bioadapt.service.db import make_engine
from bioadapt.service.execution import DEFAULT_ACTOR_IDLE_S, ModelPool, ModelSpec, describe, pool_size, run_once
from bioadapt.service.jobs import Job, JobRunner, Jobs
from bioadapt.service.limits import JobQuota, Limits
from bioadapt.service.opened import OpenedCache
from bioadapt.service.paths import PathGuard
from bioadapt.service.store import ProjectStore
from bioadapt.service.tasks import evaluate, export, fine_tune, predict, score

log = logging.getLogger(__name__)

DEFAULT_MAX_PATCH_PIXELS = 2048 * 2048
MAX_RETURNED_BYTES = 64 * 2**20
PATCH_LOCKS = 64  # submissions to one patch are serialised; patches share these locks by their id
DELETE_WAIT_S = 30  # how long delete_project waits for the project's cancelled jobs to stop


@dataclass(frozen=True)
class Caller:
    id: str
    anonymous: bool = False


class BioadaptService:
    def __init__(self, data_dir: str | Path, *, database_url: str | None = None,
                 allow_paths: Sequence[str | Path] = (), public: bool = False,
                 max_patch_pixels: int = DEFAULT_MAX_PATCH_PIXELS, gpu_fraction: float = 0.5,
                 device: str = "auto", actor_idle_s: float = DEFAULT_ACTOR_IDLE_S, limits: Limits | None = None):
        self.data_dir = Path(data_dir).expanduser().resolve()
        (self.data_dir / "projects").mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(self.data_dir / "bioadapt.sqlite", database_url)
        self.store = ProjectStore(self.engine)
        self.jobs = Jobs(engine=self.engine)
        self.interrupted = self.jobs.mark_interrupted()
        self.guard = PathGuard(allow_paths, private=self.data_dir)
        self.public = public
        self.max_patch_pixels = max_patch_pixels
        self.gpu_fraction = gpu_fraction
        self.device = device
        self.pool = ModelPool(gpu_fraction, idle_s=actor_idle_s)
        self.opened = OpenedCache()
        self._patch_locks = [threading.Lock() for _ in range(PATCH_LOCKS)]
        self.draw_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)  # one draw per project
        self.limits = limits or Limits.from_env()
        self.job_quota = JobQuota(self.limits.jobs, self._running_jobs)

    def close(self, wait_s: float = 10) -> None:
        """Cancel the running jobs (waiting up to ``wait_s``) and stop the idle model actors."""
        self.jobs.cancel_all(wait_s=wait_s)
        self.pool.close()

    # -- what the tasks use ---------------------------------------------------------------------------
    def owned_project(self, caller: Caller, project_id: str) -> dict[str, Any]:
        project = self.store.project(project_id)
        if project is None or project["owner"] != caller.id:
            raise BioadaptError(f"no project {project_id!r}; list_projects shows yours")
        return project

    def version(self, project: dict[str, Any], number: int | None) -> dict[str, Any]:
        """A model version of the project (the latest with None)."""
        version = self.store.version(project["id"], number)
        if version is None:
            known = [v["number"] for v in self.store.versions(project["id"])]
            raise BioadaptError(f"project {project['id']!r} has no model version {number}; it has {known}")
        return version

    def model_spec(self, project: dict[str, Any], version: dict[str, Any]) -> ModelSpec:
        return ModelSpec(project["model_source"], {**project["model_options"], "device": self.device},
                         version["path"])

    def pool_size(self, requested: int | None) -> int:
        return pool_size(requested, self.gpu_fraction)

    def image_row(self, project: dict[str, Any], image_id: str) -> dict[str, Any]:
        image = self.store.image(project["id"], image_id)
        if image is None:
            raise BioadaptError(f"project {project['id']!r} has no image {image_id!r}; get_project lists them")
        return image

    @staticmethod
    def image_ref(row: dict[str, Any]) -> ImageRef:
        return ImageRef(row["uri"], row["axes"], tuple(row["channels"]) if row["channels"] else None,
                        row.get("storage_options") or {})

    def opened_image(self, row: dict[str, Any]) -> Any:
        return self.opened.get(("image", row["project_id"], row["id"]), self.image_ref(row).open)

    def _opened_store(self, kind: str, row: dict[str, Any]) -> Any:
        from bioadapt.data import LabelStore, UncertaintyStore

        opener = UncertaintyStore.open if kind == "uncertainty" else LabelStore.open
        return self.opened.get((kind, row["project_id"], row[kind]), lambda: opener(row[kind]))

    @staticmethod
    def sampling_mask(image: Any, row: dict[str, Any]) -> Any:
        from bioadapt.data.sampling import resolve_mask

        return resolve_mask(image, row["mask"])

    def regions(self, project: dict[str, Any], split: str) -> list[LabelledRegion]:
        """The project's annotated patches of one split (train, holdout), oldest annotation first."""
        rows = {row["id"]: row for row in self.store.images(project["id"])}
        return [LabelledRegion(self.image_ref(rows[p["image_id"]]), rows[p["image_id"]]["labels"],
                               tuple(p["origin"]), tuple(p["shape"]))
                for p in self.store.patches(project["id"], status="annotated", split=split, order="annotated")]

    def start_job(self, kind: str, work: Callable[[JobRunner], Any], caller: Caller, project: dict[str, Any],
                  progress: Callable[[dict], Any] | None) -> JobRunner:
        """Start a task's job, within the caller's limit of jobs running at once."""
        with self.job_quota.reserve(caller.id):
            return self.jobs.start(kind, work, project_id=project["id"], owner=caller.id, progress=progress)

    def _running_jobs(self, user: str) -> int:
        return sum(1 for runner in self.jobs.running() if runner.job.owner == user)

    def job_folder(self, project: dict[str, Any], job_id: str) -> Path:
        folder = Path(project["folder"]) / "jobs" / job_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # -- access ---------------------------------------------------------------------------------------
    def _may_create(self, caller: Caller) -> None:
        if caller.anonymous and not self.public:
            raise AccessDenied("anonymous callers cannot create projects or load models on this service: connect "
                               "with a token")

    # -- models ---------------------------------------------------------------------------------------
    def load_model(self, caller: Caller, args: s.LoadModel) -> dict[str, Any]:
        self._may_create(caller)
        return _public_model(self.store.add_model(caller.id, **self._described(args)))

    def _described(self, args: s.LoadModel) -> dict[str, Any]:
        """Source, options and describe() of a model, loaded once in a Ray worker to check that it works."""
        source = self.guard.model_source(args.source)
        if scheme_of(source) in ("http", "https"):
            check_reachable(source)  # else the worker's error talks of the zoo's id map, not of the address
        options = {k: v for k, v in {"dropout_p": args.dropout_p, "mc_scope": args.mc_scope,
                                     "mc_depth": args.mc_depth, "dropout_kind": args.dropout_kind,
                                     "output_activation": args.output_activation,
                                     "sample_source": args.sample_source}.items() if v is not None}
        info = run_once(ModelSpec(source, {**options, "device": "cpu"}), describe)
        return {"source": source, "options": options, "info": info}

    def list_models(self, caller: Caller, args: s.ListModels) -> list[dict[str, Any]]:
        return [_public_model(m) for m in self.store.models(caller.id)]

    # -- projects -------------------------------------------------------------------------------------
    def create_project(self, caller: Caller, args: s.CreateProject) -> dict[str, Any]:
        self._may_create(caller)
        model = self.store.model(args.model)
        if model is not None and model["owner"] != caller.id:
            model = None  # another user's model id is taken as what it would be if it did not exist: a source
        described = self._described(s.LoadModel(source=args.model)) if model is None else model
        images = [self._checked_image(spec, described["info"]) for spec in args.images]  # all checked before writing
        model = model or self.store.add_model(caller.id, **described)
        folder = str(self.data_dir / "projects" / "{id}")
        project = self.store.create_project(caller.id, args.name, args.description, model, folder,
                                            args.holdout_fraction)
        try:
            for image, spec in images:
                self._store_image(project, image, spec)
        except Exception:
            self._delete(project)
            raise
        return self.get_project(caller, s.GetProject(project_id=project["id"]))

    def list_projects(self, caller: Caller, args: s.ListProjects) -> list[dict[str, Any]]:
        return [{"id": p["id"], "name": p["name"], "created": p["created"], "model": p["model_source"],
                 "patches": self.store.counts(p["id"])} for p in self.store.projects(caller.id)]

    def get_project(self, caller: Caller, args: s.GetProject) -> dict[str, Any]:
        project = self.owned_project(caller, args.project_id)
        return {"id": project["id"], "name": project["name"], "description": project["description"],
                "owner": project["owner"], "created": project["created"], "folder": project["folder"],
                "model": {"source": project["model_source"], "options": project["model_options"],
                          "info": project["model_info"]},
                "holdout_fraction": project["holdout_fraction"],
                "images": [_public_image(i) for i in self.store.images(project["id"])],
                "versions": self.store.versions(project["id"]), "patches": self.store.counts(project["id"])}

    def delete_project(self, caller: Caller, args: s.DeleteProject) -> dict[str, Any]:
        """Cancel the project's jobs and wait (a while) for them to stop writing into its folder, then remove
        its records (jobs included), its folder and the idle actors holding its model versions."""
        project = self.owned_project(caller, args.project_id)
        specs = [self.model_spec(project, version) for version in self.store.versions(project["id"])]
        self.jobs.cancel_all(project["id"], wait_s=DELETE_WAIT_S)
        self.pool.drop(specs)  # its jobs gave their actors back: none would serve this project again
        self._delete(project)
        return {"deleted": project["id"]}

    def _delete(self, project: dict[str, Any]) -> None:
        self.store.delete_project(project["id"])
        self.opened.forget_project(project["id"])
        shutil.rmtree(project["folder"], ignore_errors=True)

    # -- images ---------------------------------------------------------------------------------------
    def add_image(self, caller: Caller, args: s.AddImage) -> dict[str, Any]:
        project = self.owned_project(caller, args.project_id)
        spec = s.ImageSpec(**args.model_dump(include=set(s.ImageSpec.model_fields)))
        image, spec = self._checked_image(spec, project["model_info"])
        return _public_image(self._store_image(project, image, spec))

    def _checked_image(self, spec: s.ImageSpec, model_info: dict[str, Any]) -> tuple[Any, s.ImageSpec]:
        from bioadapt.data import open_image

        uri = self.guard.uri(spec.uri)
        try:
            image = open_image(uri, spec.axes, spec.channels, storage_options=spec.storage_options or None)
            image.check_decodes()
        except BioadaptError:
            raise
        except Exception as e:
            raise BioadaptError(f"cannot open image {spec.uri!r}: {e}") from e
        if image.n_channels != model_info["input_channels"]:
            raise BioadaptError(f"image {spec.uri!r} gives {image.n_channels} channel(s) but the model takes "
                                f"{model_info['input_channels']}; choose them with channels=[...]")
        if len(image.spatial_axes) != len(model_info["axes"]) - 1:
            raise BioadaptError(f"image {spec.uri!r} is {len(image.spatial_axes)}D ({image.spatial_axes}) but the "
                                f"model takes {model_info['axes']} inputs")
        if spec.mask not in (None, "auto") and spec.mask.removeprefix("labels/") not in image.label_names:
            raise BioadaptError(f"image {spec.uri!r} has no label image {spec.mask!r} to use as a mask; it has "
                                f"{image.label_names}; or use mask='auto' (foreground of the coarsest level)")
        return image, spec.model_copy(update={"uri": uri})

    def _store_image(self, project: dict[str, Any], image: Any, spec: s.ImageSpec) -> dict[str, Any]:
        from bioadapt.data import LabelStore, UncertaintyStore

        image_id = uuid.uuid4().hex[:12]
        folder = Path(project["folder"]) / "images" / image_id
        folder.mkdir(parents=True)
        labels = LabelStore.create(folder / "labels.ome.zarr", like=image, name="corrections")
        predictions = LabelStore.create(folder / "predictions.ome.zarr", like=image, name="model")
        uncertainty = UncertaintyStore.create(folder / "uncertainty.ome.zarr", like=image)
        self.opened.get(("image", project["id"], image_id), lambda: image)  # opened once: remote metadata is slow
        return self.store.add_image(project["id"], {
            "id": image_id, "uri": spec.uri, "axes": spec.axes, "channels": spec.channels, "mask": spec.mask,
            "shape": list(image.shape), "spatial_axes": image.spatial_axes, "labels": str(labels.path),
            "predictions": str(predictions.path), "uncertainty": str(uncertainty.path),
            "storage_options": spec.storage_options or {}})

    def get_overview(self, caller: Caller, args: s.GetOverview) -> dict[str, Any]:
        project = self.owned_project(caller, args.project_id)
        row = self.image_row(project, args.image_id)
        uncertainty = self._opened_store("uncertainty", row)
        level, values = uncertainty.overview(args.max_pixels)
        image = self.opened_image(row)
        fitting = [lv.index for lv in image.levels
                   if math.prod(image.spatial_shape_of(lv.index)) * image.n_channels <= args.max_pixels]
        answer = {"image_id": row["id"], "shape": list(image.spatial_shape), "spatial_axes": image.spatial_axes,
                  "uncertainty": values, "uncertainty_factors": list(uncertainty.factors(level)),
                  "image": None, "image_factors": None,
                  "scored_fraction": float(np.isfinite(values).mean()) if values.size else 0.0}
        if fitting:
            answer["image"] = image.read_level(fitting[0], max_pixels=args.max_pixels)
            answer["image_factors"] = list(image.levels[fitting[0]].factors)
        return answer

    # -- scoring and selection ------------------------------------------------------------------------
    def score(self, caller: Caller, args: s.Score, progress: Callable[[dict], Any] | None = None) -> dict[str, Any]:
        return score.submit(self, caller, args, progress)

    def select_patches(self, caller: Caller, args: s.SelectPatches) -> dict[str, Any]:
        project = self.owned_project(caller, args.project_id)
        name, strategy, key = score.strategy_of(args, project["model_info"])
        picked = score.select_pending(self, project["id"], strategy.selection, key, args.select, seed=args.seed)
        return {"strategy": name, "selection": strategy.selection, "selected": picked}

    # -- patches --------------------------------------------------------------------------------------
    def list_patches(self, caller: Caller, args: s.ListPatches) -> list[dict[str, Any]]:
        project = self.owned_project(caller, args.project_id)
        return self.store.patches(project["id"], order=args.order, status=args.status, image_id=args.image_id,
                                  limit=args.limit, offset=args.offset)

    def _patch(self, project: dict[str, Any], patch_id: int) -> dict[str, Any]:
        patch = self.store.patch(project["id"], patch_id)
        if patch is None:
            raise BioadaptError(f"project {project['id']!r} has no patch {patch_id}; list_patches shows them")
        return patch

    def get_patch(self, caller: Caller, args: s.GetPatch) -> dict[str, Any]:
        project = self.owned_project(caller, args.project_id)
        patch = self._patch(project, args.patch_id)
        if math.prod(patch["shape"]) > self.max_patch_pixels:
            raise BioadaptError(f"patch {patch['id']} has {math.prod(patch['shape'])} pixels, over the transfer "
                                f"limit of {self.max_patch_pixels}; read it from the Zarr stores instead")
        row = self.image_row(project, patch["image_id"])
        origin, shape = patch["origin"], patch["shape"]
        answer = {**patch, "image": self.opened_image(row).read(origin, shape),
                  "predicted_labels": self._opened_store("predictions", row).read(origin, shape),
                  "uncertainty": self._opened_store("uncertainty", row).read(origin, shape)}
        if patch["status"] == "annotated":
            answer["labels"] = self._opened_store("labels", row).read(origin, shape)
        return answer

    def submit_labels(self, caller: Caller, args: s.SubmitLabels) -> dict[str, Any]:
        project = self.owned_project(caller, args.project_id)
        patch = self._patch(project, args.patch_id)
        labels = _labels(args.labels, patch["shape"])
        row = self.image_row(project, patch["image_id"])
        with self._patch_locks[patch["id"] % PATCH_LOCKS]:
            self._opened_store("labels", row).write(patch["origin"], labels, author=caller.id)
            return self.store.mark_annotated(project["id"], patch["id"], caller.id, project["holdout_fraction"])

    def skip_patch(self, caller: Caller, args: s.SkipPatch) -> dict[str, Any]:
        project = self.owned_project(caller, args.project_id)
        patch = self._patch(project, args.patch_id)
        if patch["status"] == "annotated":
            raise BioadaptError(f"patch {patch['id']} is already annotated; it cannot be skipped")
        return self.store.set_status(project["id"], patch["id"], "skipped")

    # -- the other tasks ------------------------------------------------------------------------------
    def fine_tune(self, caller: Caller, args: s.FineTune, progress: Callable[[dict], Any] | None = None
                  ) -> dict[str, Any]:
        return fine_tune.submit(self, caller, args, progress)

    def evaluate(self, caller: Caller, args: s.Evaluate, progress: Callable[[dict], Any] | None = None
                 ) -> dict[str, Any]:
        return evaluate.submit(self, caller, args, progress)

    def predict(self, caller: Caller, args: s.Predict, progress: Callable[[dict], Any] | None = None
                ) -> dict[str, Any]:
        return predict.submit(self, caller, args, progress)

    def export_model(self, caller: Caller, args: s.ExportModel, progress: Callable[[dict], Any] | None = None
                     ) -> dict[str, Any]:
        return export.submit(self, caller, args, progress)

    # -- jobs -----------------------------------------------------------------------------------------
    def _job(self, caller: Caller, job_id: str) -> Job:
        try:
            job = self.jobs.get(job_id)
        except BioadaptError:
            job = None
        if job is None or job.owner != caller.id:  # another user's job answers as a missing one
            raise BioadaptError(f"no job {job_id!r}; list_jobs shows yours")
        return job

    def job_status(self, caller: Caller, args: s.JobStatus) -> dict[str, Any]:
        return self._public_job(self._job(caller, args.job_id))

    def list_jobs(self, caller: Caller, args: s.ListJobs) -> list[dict[str, Any]]:
        if args.project_id is not None:
            self.owned_project(caller, args.project_id)
        return [self._public_job(job) for job in self.jobs.list(project_id=args.project_id, owner=caller.id)]

    def _public_job(self, job: Job) -> dict[str, Any]:
        answer = job.to_dict()
        if answer["error"]:  # a worker's cause may name files in the data folder
            answer["error"] = self.guard.redact(answer["error"])
        return answer

    def cancel_job(self, caller: Caller, args: s.CancelJob) -> dict[str, Any]:
        """Ask a job to stop; ``cancel_requested`` only when it was still running here (a finished job, or one a
        restart interrupted, has nothing to cancel)."""
        job = self._job(caller, args.job_id)
        requested = job.state in ("queued", "running") and self.jobs.cancel(job.id)
        return {"job_id": job.id, "state": job.state, "cancel_requested": requested}

    def job_output(self, caller: Caller, args: s.JobOutput) -> Any:
        job = self._job(caller, args.job_id)
        outputs = (job.result or {}).get("outputs", {}) if isinstance(job.result, dict) else {}
        if args.name not in outputs:
            raise BioadaptError(f"job {job.id} ({job.kind}, {job.state}) has no output {args.name!r}; it has "
                                f"{sorted(outputs)}")
        path = Path(outputs[args.name])
        if not path.is_file():
            raise BioadaptError(f"the output {args.name!r} of job {job.id} is gone (its project was deleted?)")
        size = path.stat().st_size
        if size > MAX_RETURNED_BYTES:
            raise BioadaptError(f"the output {args.name!r} has {size} bytes, over {MAX_RETURNED_BYTES}; fetch it "
                                f"from {path}")
        return np.load(path, allow_pickle=False) if path.suffix == ".npy" else path.read_bytes()


def _labels(labels: Any, shape: Sequence[int]) -> np.ndarray:
    """A copy of the labels (received arrays are read-only views) once their shape is the patch's; the label
    store checks their values."""
    if not isinstance(labels, np.ndarray):
        raise BioadaptError(f"labels must be a numpy integer array, got {type(labels).__name__}")
    if list(labels.shape) != list(shape):
        raise BioadaptError(f"labels of shape {list(labels.shape)} do not match the patch's shape {list(shape)}")
    return labels.copy()


def _public_model(model: dict[str, Any]) -> dict[str, Any]:
    return {"id": model["id"], "source": model["source"], "options": model["options"], "info": model["info"],
            "created": model["created"]}


def _public_image(row: dict[str, Any]) -> dict[str, Any]:
    """An image as callers see it: never its storage options (they may hold credentials)."""
    return {k: row[k] for k in ("id", "uri", "axes", "channels", "mask", "shape", "spatial_axes", "created")}
