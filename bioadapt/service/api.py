"""What each service function does, independent of Hypha: projects owned by their creator, images confined to
allowed roots, arrays kept in Zarr under each project's folder. Quick calls are answered here; every long
operation is a task (``service/tasks/``) run as a job on Ray actors leased from the service's model pool.

Every public method takes the caller first and the validated arguments (``schemas``) second, and is blocking:
the Hypha layer runs it in a thread pool.
"""

from __future__ import annotations

import importlib
import logging
import math
import shutil
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bioadapt.data.stores import check_reachable, scheme_of
from bioadapt.errors import AccessDenied, BioadaptError
from bioadapt.service import schemas as s
from bioadapt.service.context import DEFAULT_MAX_PATCH_PIXELS, Caller, ServiceContext
from bioadapt.service.db import make_engine
from bioadapt.service.execution import DEFAULT_ACTOR_IDLE_S, ModelSpec, describe, run_once
from bioadapt.service.holdout import learning_curve
from bioadapt.service.jobs import Job
from bioadapt.service.limits import Limits
from bioadapt.service.public import model_name, public_image, public_model, public_result, public_version
from bioadapt.service.tasks import score

log = logging.getLogger(__name__)

MAX_RETURNED_BYTES = 64 * 2**20
PATCH_LOCKS = 64  # submissions to one patch are serialised; patches share these locks by their id
DELETE_WAIT_S = 30  # how long delete_project waits for the project's cancelled jobs to stop

__all__ = ["BioadaptService", "Caller"]


class BioadaptService:
    """The quick calls, answered here, and the tasks of ``schemas.FUNCTIONS`` (a method each, made from that
    registry, which hands the task's ``submit`` the service's ``context``)."""

    def __init__(self, data_dir: str | Path, *, database_url: str | None = None,
                 allow_paths: Sequence[str | Path] = (), public: bool = False,
                 max_patch_pixels: int = DEFAULT_MAX_PATCH_PIXELS, gpu_fraction: float = 0.5,
                 device: str = "auto", actor_idle_s: float = DEFAULT_ACTOR_IDLE_S, limits: Limits | None = None):
        data_dir = Path(data_dir).expanduser().resolve()
        (data_dir / "projects").mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(data_dir / "bioadapt.sqlite", database_url)
        self.context = ServiceContext(data_dir, self.engine, allow_paths=allow_paths,
                                      max_patch_pixels=max_patch_pixels, gpu_fraction=gpu_fraction, device=device,
                                      actor_idle_s=actor_idle_s, limits=limits)
        context = self.context  # the parts the quick calls use, by their names
        self.data_dir, self.store, self.jobs, self.pool, self.opened = (context.data_dir, context.store, context.jobs,
                                                                        context.pool, context.opened)
        self.guard, self.limits = context.guard, context.limits
        self.public = public
        self._patch_locks = [threading.Lock() for _ in range(PATCH_LOCKS)]
        self.interrupted = len(self.jobs.fail_lapsed())  # only jobs whose replica stopped renewing their lease

    def close(self, wait_s: float = 10) -> None:
        """Cancel the running jobs (waiting up to ``wait_s``) and stop the idle model actors."""
        self.jobs.cancel_all(wait_s=wait_s)
        self.jobs.close()
        self.pool.close()

    # -- access ---------------------------------------------------------------------------------------
    def _may_create(self, caller: Caller) -> None:
        if caller.anonymous and not self.public:
            raise AccessDenied("anonymous callers cannot create projects or load models on this service: connect "
                               "with a token")

    # -- models ---------------------------------------------------------------------------------------
    def load_model(self, caller: Caller, args: s.LoadModel) -> dict[str, Any]:
        self._may_create(caller)
        return public_model(self.store.add_model(caller.id, **self._described(args)))

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
        return [public_model(m) for m in self.store.models(caller.id)]

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
        return [{"id": p["id"], "name": p["name"], "created": p["created"],
                 "model": model_name(p["model_info"], p["model_source"]), "patches": self.store.counts(p["id"])}
                for p in self.store.projects(caller.id)]

    def get_project(self, caller: Caller, args: s.GetProject) -> dict[str, Any]:
        project = self.context.owned_project(caller, args.project_id)
        versions = self.store.versions(project["id"])
        return {"id": project["id"], "name": project["name"], "description": project["description"],
                "owner": project["owner"], "created": project["created"],
                "model": {"name": model_name(project["model_info"], project["model_source"]),
                          "source": project["model_source"], "options": project["model_options"],
                          "info": project["model_info"]},
                "holdout_fraction": project["holdout_fraction"],
                "images": [public_image(i) for i in self.store.images(project["id"])],
                "versions": [public_version(v) for v in versions],
                "default_version": self.store.version(project["id"])["number"],
                "learning_curve": learning_curve(versions), "patches": self.store.counts(project["id"])}

    def delete_project(self, caller: Caller, args: s.DeleteProject) -> dict[str, Any]:
        """Cancel the project's jobs and wait (a while) for them to stop writing into its folder, then remove
        its records (jobs included), its folder and the idle actors holding its model versions."""
        project = self.context.owned_project(caller, args.project_id)
        specs = [self.context.model_spec(project, version) for version in self.store.versions(project["id"])]
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
        project = self.context.owned_project(caller, args.project_id)
        spec = s.ImageSpec(**args.model_dump(include=set(s.ImageSpec.model_fields)))
        image, spec = self._checked_image(spec, project["model_info"])
        return public_image(self._store_image(project, image, spec))

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
        project = self.context.owned_project(caller, args.project_id)
        row = self.context.image_row(project, args.image_id)
        uncertainty = self.context.opened_store("uncertainty", row)
        level, values = uncertainty.overview(args.max_pixels)
        image = self.context.opened_image(row)
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

    # -- selection (scoring is the score task) -----------------------------------------------------------
    def select_patches(self, caller: Caller, args: s.SelectPatches) -> dict[str, Any]:
        project = self.context.owned_project(caller, args.project_id)
        name, strategy, key = score.strategy_of(args, project["model_info"])
        picked = score.select_pending(self.context, project["id"], strategy.selection, key, args.select, seed=args.seed)
        return {"strategy": name, "selection": strategy.selection, "selected": picked}

    # -- patches --------------------------------------------------------------------------------------
    def list_patches(self, caller: Caller, args: s.ListPatches) -> list[dict[str, Any]]:
        project = self.context.owned_project(caller, args.project_id)
        return self.store.patches(project["id"], order=args.order, status=args.status, image_id=args.image_id,
                                  limit=args.limit, offset=args.offset)

    def _patch(self, project: dict[str, Any], patch_id: int) -> dict[str, Any]:
        patch = self.store.patch(project["id"], patch_id)
        if patch is None:
            raise BioadaptError(f"project {project['id']!r} has no patch {patch_id}; list_patches shows them")
        return patch

    def get_patch(self, caller: Caller, args: s.GetPatch) -> dict[str, Any]:
        project = self.context.owned_project(caller, args.project_id)
        patch = self._patch(project, args.patch_id)
        if math.prod(patch["shape"]) > self.context.max_patch_pixels:
            raise BioadaptError(f"patch {patch['id']} has {math.prod(patch['shape'])} pixels, over the transfer "
                                f"limit of {self.context.max_patch_pixels}; read it from the Zarr stores instead")
        row = self.context.image_row(project, patch["image_id"])
        origin, shape = patch["origin"], patch["shape"]
        answer = {**patch, "image": self.context.opened_image(row).read(origin, shape),
                  "predicted_labels": self.context.opened_store("predictions", row).read(origin, shape),
                  "uncertainty": self.context.opened_store("uncertainty", row).read(origin, shape)}
        if patch["status"] == "annotated":
            answer["labels"] = self.context.opened_store("labels", row).read(origin, shape)
        return answer

    def submit_labels(self, caller: Caller, args: s.SubmitLabels) -> dict[str, Any]:
        project = self.context.owned_project(caller, args.project_id)
        patch = self._patch(project, args.patch_id)
        labels = _labels(args.labels, patch["shape"])
        row = self.context.image_row(project, patch["image_id"])
        with self._patch_locks[patch["id"] % PATCH_LOCKS]:
            self.context.opened_store("labels", row).write(patch["origin"], labels, author=caller.id)
            return self.store.mark_annotated(project["id"], patch["id"], caller.id, project["holdout_fraction"])

    def skip_patch(self, caller: Caller, args: s.SkipPatch) -> dict[str, Any]:
        project = self.context.owned_project(caller, args.project_id)
        patch = self._patch(project, args.patch_id)
        if patch["status"] == "annotated":
            raise BioadaptError(f"patch {patch['id']} is already annotated; it cannot be skipped")
        return self.store.set_status(project["id"], patch["id"], "skipped")

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
            self.context.owned_project(caller, args.project_id)
        return [self._public_job(job) for job in self.jobs.list(project_id=args.project_id, owner=caller.id)]

    def _public_job(self, job: Job) -> dict[str, Any]:
        answer = job.to_dict()
        answer["result"] = public_result(answer["result"])  # its files are fetched by name (job_output)
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
            raise BioadaptError(f"the output {args.name!r} of job {job.id} has {size / 2**20:.0f} MiB, more than "
                                f"the {MAX_RETURNED_BYTES // 2**20} MiB one call returns; the service's operator "
                                "can copy it from the service's data folder (exports/ of the project)")
        return np.load(path, allow_pickle=False) if path.suffix == ".npy" else path.read_bytes()


def _labels(labels: Any, shape: Sequence[int]) -> np.ndarray:
    """A copy of the labels (received arrays are read-only views) once their shape is the patch's; the label
    store checks their values."""
    if not isinstance(labels, np.ndarray):
        raise BioadaptError(f"labels must be a numpy integer array, got {type(labels).__name__}")
    if list(labels.shape) != list(shape):
        raise BioadaptError(f"labels of shape {list(labels.shape)} do not match the patch's shape {list(shape)}")
    return labels.copy()


def _task_method(name: str, task: str) -> Callable[..., dict[str, Any]]:
    def run(self: BioadaptService, caller: Caller, args: s.Args, progress: Callable[[dict], Any] | None = None
            ) -> dict[str, Any]:
        submit = importlib.import_module(f"bioadapt.service.tasks.{task}").submit
        return submit(self.context, caller, args, progress)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = s.FUNCTIONS[name].args.__doc__
    return run


for _name, _function in s.FUNCTIONS.items():
    if _function.task is not None:
        setattr(BioadaptService, _name, _task_method(_name, _function.task))
