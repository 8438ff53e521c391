"""What each service function does, independent of Hypha: projects owned by their creator, images confined to
allowed roots, patches scored and models tuned by Ray jobs, arrays kept in Zarr under each project's folder.

Every public method takes the caller first and the validated arguments (``schemas``) second, and is blocking:
the Hypha layer runs it in a thread pool.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bioadapt.data.stores import check_reachable, scheme_of
from bioadapt.errors import AccessDenied, BioadaptError
from bioadapt.service import schemas as s
from bioadapt.service.db import make_engine
from bioadapt.service.execution import (FineTuneRequest, ImageRef, LabelledRegion, ScoreRequest,
                                        create_uncertainty_store, run_on_worker)
from bioadapt.service.jobs import JobRunner, JobStore, fine_tune_job, run_score
from bioadapt.service.limits import JobQuota, Limits
from bioadapt.service.paths import PathGuard
from bioadapt.service.store import ProjectStore

log = logging.getLogger(__name__)

DEFAULT_MAX_PATCH_PIXELS = 2048 * 2048
MAX_RETURNED_EXPORT_BYTES = 64 * 2**20
DELETE_WAIT_S = 30  # how long delete_project waits for the project's cancelled jobs to stop


@dataclass(frozen=True)
class Caller:
    id: str
    anonymous: bool = False


class BioadaptService:
    def __init__(self, data_dir: str | Path, *, database_url: str | None = None,
                 allow_paths: Sequence[str | Path] = (), public: bool = False,
                 max_patch_pixels: int = DEFAULT_MAX_PATCH_PIXELS, gpu_fraction: float = 0.5,
                 device: str = "auto", limits: Limits | None = None):
        self.data_dir = Path(data_dir).expanduser().resolve()
        (self.data_dir / "projects").mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(self.data_dir / "bioadapt.sqlite", database_url)
        self.store = ProjectStore(self.engine)
        self.jobs = JobStore(engine=self.engine)
        self.interrupted = self.jobs.mark_interrupted()
        self.guard = PathGuard(allow_paths, private=self.data_dir)
        self.public = public
        self.max_patch_pixels = max_patch_pixels
        self.gpu_fraction = gpu_fraction
        self.device = device
        self.runners: dict[str, JobRunner] = {}
        self.limits = limits or Limits.from_env()
        self.job_quota = JobQuota(self.limits.jobs, self._running_jobs)
        self._open: dict[tuple, Any] = {}
        self._patch_locks: defaultdict[tuple[str, int], threading.Lock] = defaultdict(threading.Lock)
        self._draw_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

    # -- access ---------------------------------------------------------------------------------------
    def _project(self, caller: Caller, project_id: str) -> dict[str, Any]:
        """The caller's project; another user's answers exactly as a missing one (ids must not be probed)."""
        project = self.store.project(project_id)
        if project is None or project["owner"] != caller.id:
            raise BioadaptError(f"no project {project_id!r}; list_projects shows yours")
        return project

    def _may_create(self, caller: Caller) -> None:
        if caller.anonymous and not self.public:
            raise AccessDenied("anonymous callers cannot create projects or load models on this service: connect "
                               "with a token")

    def _options(self, project: dict[str, Any]) -> dict[str, Any]:
        return {**project["model_options"], "device": self.device}

    def _weights(self, project: dict[str, Any], number: int | None) -> tuple[dict[str, Any], str | None]:
        version = self.store.version(project["id"], number)
        if version is None:
            known = [v["number"] for v in self.store.versions(project["id"])]
            raise BioadaptError(f"project {project['id']!r} has no model version {number}; it has {known}")
        return version, version["path"]

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
                                     "output_activation": args.output_activation}.items() if v is not None}
        info = run_on_worker(source, {**options, "device": "cpu"}, None, "describe")
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
        project = self._project(caller, args.project_id)
        return {"id": project["id"], "name": project["name"], "description": project["description"],
                "owner": project["owner"], "created": project["created"], "folder": project["folder"],
                "model": {"source": project["model_source"], "options": project["model_options"],
                          "info": project["model_info"]},
                "holdout_fraction": project["holdout_fraction"],
                "images": [_public_image(i) for i in self.store.images(project["id"])],
                "versions": self.store.versions(project["id"]), "patches": self.store.counts(project["id"])}

    def delete_project(self, caller: Caller, args: s.DeleteProject) -> dict[str, Any]:
        """Cancel the project's jobs and wait (a while) for them to stop writing into its folder, then remove
        its records (jobs included) and its folder."""
        project = self._project(caller, args.project_id)
        runners = [self.runners[job.id] for job in self.jobs.list(project_id=project["id"]) if job.id in self.runners]
        for runner in runners:
            runner.cancel()
        deadline = time.monotonic() + DELETE_WAIT_S
        for runner in runners:
            runner.thread.join(max(0.0, deadline - time.monotonic()))
            self.runners.pop(runner.job.id, None)
        self._delete(project)
        return {"deleted": project["id"]}

    def _delete(self, project: dict[str, Any]) -> None:
        self.store.delete_project(project["id"])
        shutil.rmtree(project["folder"], ignore_errors=True)

    # -- images ---------------------------------------------------------------------------------------
    def add_image(self, caller: Caller, args: s.AddImage) -> dict[str, Any]:
        project = self._project(caller, args.project_id)
        spec = s.ImageSpec(uri=args.uri, axes=args.axes, channels=args.channels, mask=args.mask)
        image, spec = self._checked_image(spec, project["model_info"])
        return _public_image(self._store_image(project, image, spec))

    def _checked_image(self, spec: s.ImageSpec, model_info: dict[str, Any]) -> tuple[Any, s.ImageSpec]:
        from bioadapt.data import open_image

        uri = self.guard.uri(spec.uri)
        try:
            image = open_image(uri, spec.axes, spec.channels)
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
        from bioadapt.data import LabelStore

        image_id = uuid.uuid4().hex[:12]
        folder = Path(project["folder"]) / "images" / image_id
        folder.mkdir(parents=True)
        labels = LabelStore.create(folder / "labels.ome.zarr", like=image, name="corrections")
        predictions = LabelStore.create(folder / "predictions.ome.zarr", like=image, name="model")
        uncertainty = create_uncertainty_store(folder / "uncertainty.zarr", image)
        return self.store.add_image(project["id"], {
            "id": image_id, "uri": spec.uri, "axes": spec.axes, "channels": spec.channels, "mask": spec.mask,
            "shape": list(image.shape), "spatial_axes": image.spatial_axes, "labels": str(labels.path),
            "predictions": str(predictions.path), "uncertainty": uncertainty})

    def _opened(self, key: tuple, open_it: Callable[[], Any]) -> Any:
        """Opened images and stores are kept (metadata parsed once); pixels are always read fresh."""
        if key not in self._open:
            self._open[key] = open_it()
        return self._open[key]

    def _opened_image(self, row: dict[str, Any]) -> Any:
        return self._opened(("image", row["uri"], row["axes"], str(row["channels"])), _ref(row).open)

    def _opened_labels(self, path: str) -> Any:
        from bioadapt.data import LabelStore

        return self._opened(("labels", path), lambda: LabelStore.open(path))

    def _image(self, project: dict[str, Any], image_id: str) -> dict[str, Any]:
        image = self.store.image(project["id"], image_id)
        if image is None:
            raise BioadaptError(f"project {project['id']!r} has no image {image_id!r}; get_project lists them")
        return image

    # -- scoring --------------------------------------------------------------------------------------
    def score(self, caller: Caller, args: s.Score, progress: Callable[[dict], Any] | None = None) -> dict[str, Any]:
        project = self._project(caller, args.project_id)
        version, weights = self._weights(project, args.version)
        images = ([self._image(project, args.image_id)] if args.image_id else self.store.images(project["id"]))
        if not images:
            raise BioadaptError(f"project {project['id']!r} has no images; add one with add_image")
        with self.job_quota.reserve(caller.id):  # before the draw: a refused call leaves no patch behind
            with self._draw_locks[project["id"]]:  # one draw per project at a time here; add_drawn checks replicas
                plan = self._draw(project, images, args)
            return self._score_job(caller, project, version, weights, args, plan, progress)

    def _score_job(self, caller: Caller, project: dict[str, Any], version: dict[str, Any], weights: str | None,
                   args: s.Score, plan: list, progress: Callable[[dict], Any] | None) -> dict[str, Any]:
        total = sum(len(todo) for _, todo in plan)
        if total == 0:
            raise BioadaptError("no new patch fits: the image (or its mask) is covered by earlier patches or too "
                                "small for this patch shape")
        options = self._options(project)

        def work(runner: JobRunner) -> dict[str, Any]:
            done, ranked = 0, []
            for row, todo in plan:
                request = ScoreRequest(image=_ref(row), patch_shape=tuple(args.patch_shape), passes=args.mc_passes,
                                       acquisition=args.acquisition, seed=args.seed, predictions=row["predictions"],
                                       uncertainty=row["uncertainty"], mask=row["mask"])
                ranked += run_score(runner, project["model_source"], options, request, todo, actors=args.actors,
                                    gpu_fraction=self.gpu_fraction, weights=weights, done_before=done, total=total,
                                    on_shard=lambda results: self.store.record_scores(
                                        project["id"], results, args.acquisition, version["number"]))
                done += len(todo)
                if runner.cancelled.is_set():
                    break
            ranked.sort(key=lambda r: -r["score"])
            return {"scored": len(ranked), "version": version["number"], "acquisition": args.acquisition,
                    "top": ranked[:20]}

        runner = self._start(JobRunner(self.jobs, "score", work, project_id=project["id"], owner=caller.id,
                                       progress=progress))
        return {"job_id": runner.job.id, "patches": total}

    def _draw(self, project: dict[str, Any], images: list[dict[str, Any]], args: s.Score) -> list:
        """New windows for every image (all checked before any is stored), stored in one transaction; earlier
        pending patches to re-score with them: [(image row, [(patch id, origin)])]."""
        from bioadapt.data import PatchWindow, sample_patches

        seen = self.store.last_patch_id(project["id"])
        drawn = []  # (image row, new windows, earlier patches to re-score)
        share = [args.n_patches // len(images) + (i < args.n_patches % len(images)) for i in range(len(images))]
        for row, n in zip(images, share):
            image = self._opened_image(row)
            if len(args.patch_shape) != len(image.spatial_axes):
                raise BioadaptError(f"patch_shape {args.patch_shape} has {len(args.patch_shape)} dimensions; the "
                                    f"image has spatial axes {image.spatial_axes!r}")
            if math.prod(args.patch_shape) > self.max_patch_pixels:
                raise BioadaptError(f"patches of {args.patch_shape} exceed {self.max_patch_pixels} pixels; use "
                                    "smaller patches")
            earlier = self.store.patches(project["id"], image_id=row["id"], order="id")
            avoid = [PatchWindow(tuple(p["origin"]), tuple(p["shape"])) for p in earlier]
            windows = sample_patches(image, n, args.patch_shape, mask=_mask(image, row["mask"]),
                                     seed=args.seed + len(earlier), avoid=avoid) if n else []
            todo = [(p["id"], p["origin"]) for p in earlier
                    if args.rescore_pending and p["status"] == "pending" and p["shape"] == args.patch_shape]
            drawn.append((row, windows, todo))
        added = self.store.add_drawn(project["id"], {row["id"]: [(w.origin, w.shape) for w in windows]
                                                     for row, windows, _ in drawn}, seen=seen)
        return [(row, todo + [(i, list(w.origin)) for i, w in zip(added[row["id"]], windows) if i is not None])
                for row, windows, todo in drawn]

    # -- patches --------------------------------------------------------------------------------------
    def list_patches(self, caller: Caller, args: s.ListPatches) -> list[dict[str, Any]]:
        project = self._project(caller, args.project_id)
        return self.store.patches(project["id"], order=args.order, status=args.status, image_id=args.image_id,
                                  limit=args.limit, offset=args.offset)

    def _patch(self, project: dict[str, Any], patch_id: int) -> dict[str, Any]:
        patch = self.store.patch(project["id"], patch_id)
        if patch is None:
            raise BioadaptError(f"project {project['id']!r} has no patch {patch_id}; list_patches shows them")
        return patch

    def get_patch(self, caller: Caller, args: s.GetPatch) -> dict[str, Any]:
        import zarr

        project = self._project(caller, args.project_id)
        patch = self._patch(project, args.patch_id)
        if math.prod(patch["shape"]) > self.max_patch_pixels:
            raise BioadaptError(f"patch {patch['id']} has {math.prod(patch['shape'])} pixels, over the transfer "
                                f"limit of {self.max_patch_pixels}; read it from the Zarr stores instead")
        row = self._image(project, patch["image_id"])
        origin, shape = patch["origin"], patch["shape"]
        window = tuple(slice(o, o + n) for o, n in zip(origin, shape))
        answer = {**patch, "image": self._opened_image(row).read(origin, shape),
                  "predicted_labels": self._opened_labels(row["predictions"]).read(origin, shape),
                  "uncertainty": np.asarray(self._opened(("uncertainty", row["uncertainty"]), lambda: zarr.open_array(
                      row["uncertainty"], mode="r"))[window])}
        if patch["status"] == "annotated":
            answer["labels"] = self._opened_labels(row["labels"]).read(origin, shape)
        return answer

    def submit_labels(self, caller: Caller, args: s.SubmitLabels) -> dict[str, Any]:
        project = self._project(caller, args.project_id)
        patch = self._patch(project, args.patch_id)
        labels = _labels(args.labels, patch["shape"])
        row = self._image(project, patch["image_id"])
        with self._patch_locks[(project["id"], patch["id"])]:
            self._opened_labels(row["labels"]).write(patch["origin"], labels, author=caller.id)
            return self.store.mark_annotated(project["id"], patch["id"], caller.id, project["holdout_fraction"])

    def skip_patch(self, caller: Caller, args: s.SkipPatch) -> dict[str, Any]:
        project = self._project(caller, args.project_id)
        patch = self._patch(project, args.patch_id)
        if patch["status"] == "annotated":
            raise BioadaptError(f"patch {patch['id']} is already annotated; it cannot be skipped")
        return self.store.set_status(project["id"], patch["id"], "skipped")

    def _regions(self, project: dict[str, Any], split: str) -> list[LabelledRegion]:
        rows = {row["id"]: row for row in self.store.images(project["id"])}
        return [LabelledRegion(_ref(rows[p["image_id"]]), rows[p["image_id"]]["labels"], tuple(p["origin"]),
                               tuple(p["shape"]))
                for p in self.store.patches(project["id"], status="annotated", split=split, order="annotated")]

    # -- fine-tuning ----------------------------------------------------------------------------------
    def fine_tune(self, caller: Caller, args: s.FineTune, progress: Callable[[dict], Any] | None = None
                  ) -> dict[str, Any]:
        project = self._project(caller, args.project_id)
        params = {**s.tuning_params(project["model_info"].get("kind", "bioimageio"), args.params),
                  "epochs": args.epochs, "learning_rate": args.learning_rate, "batch_size": args.batch_size}
        base, weights = self._weights(project, args.base_version)
        regions = self._regions(project, "train")
        if not regions:
            raise BioadaptError("no annotated training patches yet: submit labels for some patches first (a share "
                                "of them is held out for evaluation)")
        folder = Path(project["folder"]) / "versions"
        target = folder / f"{uuid.uuid4().hex[:12]}.pt"

        def record(outcome: dict[str, Any], job_id: str) -> dict[str, Any]:
            if outcome["version"] is None:
                return outcome
            number = self.store.version(project["id"])["number"] + 1
            self.store.add_version(project["id"], number, base["number"], outcome["version"], params,
                                   {"training": outcome["result"], "patches": len(regions)}, job_id)
            return {**outcome, "version": number, "parent": base["number"], "path": outcome["version"]}

        with self.job_quota.reserve(caller.id):
            runner = self._start(fine_tune_job(
                self.jobs, project["model_source"], self._options(project), FineTuneRequest(tuple(regions), params),
                folder, weights=weights, target=target, project_id=project["id"], owner=caller.id, on_result=record,
                progress=progress))
        return {"job_id": runner.job.id, "patches": len(regions), "base_version": base["number"]}

    # -- jobs -----------------------------------------------------------------------------------------
    def _start(self, runner: JobRunner) -> JobRunner:
        """Keep a started job's runner (for cancel and the per-user limit); forget those that ended."""
        for job_id, other in list(self.runners.items()):
            if not other.thread.is_alive():
                self.runners.pop(job_id, None)
        self.runners[runner.job.id] = runner
        return runner

    def _running_jobs(self, user: str) -> int:
        return sum(1 for r in list(self.runners.values()) if r.job.owner == user and r.thread.is_alive())

    def _job(self, caller: Caller, job_id: str):
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
            self._project(caller, args.project_id)
        return [self._public_job(job) for job in self.jobs.list(project_id=args.project_id, owner=caller.id)]

    def _public_job(self, job: Any) -> dict[str, Any]:
        answer = job.to_dict()
        if answer["error"]:  # a worker's cause may name files in the data folder
            answer["error"] = self.guard.redact(answer["error"])
        return answer

    def cancel_job(self, caller: Caller, args: s.CancelJob) -> dict[str, Any]:
        """Ask a job to stop; ``cancel_requested`` only when it was still running here (a finished job, or one a
        restart interrupted, has nothing to cancel)."""
        job = self._job(caller, args.job_id)
        runner = self.runners.get(job.id)
        requested = runner is not None and runner.thread.is_alive() and job.state in ("queued", "running")
        if requested:
            runner.cancel()
        return {"job_id": job.id, "state": job.state, "cancel_requested": requested}

    # -- evaluation, prediction, export ---------------------------------------------------------------
    def evaluate(self, caller: Caller, args: s.Evaluate) -> dict[str, Any]:
        project = self._project(caller, args.project_id)
        numbers = args.versions or sorted({0, self.store.version(project["id"])["number"]})
        regions = self._regions(project, "holdout")
        if not regions:
            raise BioadaptError("no held-out annotated patches: annotate more patches (a share of them, "
                                f"holdout_fraction={project['holdout_fraction']}, is kept for evaluation)")
        weights_of = {number: self._weights(project, number)[1] for number in numbers}  # all checked first
        results = {}
        for number, weights in weights_of.items():
            metrics = run_on_worker(project["model_source"], self._options(project), weights, "evaluate", regions)
            self.store.update_version_metrics(project["id"], number, {"holdout": metrics})
            results[str(number)] = metrics
        return {"versions": results, "holdout_patches": len(regions)}

    def predict(self, caller: Caller, args: s.Predict) -> dict[str, Any]:
        project = self._project(caller, args.project_id)
        row = self._image(project, args.image_id)
        _, weights = self._weights(project, args.version)
        if len(args.origin) != len(row["spatial_axes"]) or len(args.shape) != len(row["spatial_axes"]):
            raise BioadaptError(f"origin and shape need one value per spatial axis {row['spatial_axes']!r}")
        if args.return_array and math.prod(args.shape) > self.max_patch_pixels:
            raise BioadaptError(f"a region of {args.shape} is over the transfer limit of {self.max_patch_pixels} "
                                "pixels; leave return_array off to write it to the project's prediction store")
        from bioadapt.data.windows import check_window

        check_window(args.origin, args.shape, self._opened_image(row).spatial_shape, axes=row["spatial_axes"],
                     where=f"image {row['id']}")
        out = None if args.return_array else row["predictions"]
        result = run_on_worker(project["model_source"], self._options(project), weights, "predict", _ref(row),
                               tuple(args.origin), tuple(args.shape), out)
        return {"labels": result, "origin": args.origin, "shape": args.shape} if args.return_array else result

    def export_model(self, caller: Caller, args: s.ExportModel) -> dict[str, Any]:
        project = self._project(caller, args.project_id)
        version, weights = self._weights(project, args.version)
        regions = self._regions(project, "train") or self._regions(project, "holdout")
        if not regions:
            raise BioadaptError("export needs one annotated patch for the package's test tensors: annotate a patch")
        images = {i["id"]: i for i in self.store.images(project["id"])}
        trained = [{"image": images[p["image_id"]]["uri"], "origin": p["origin"], "shape": p["shape"]}
                   for p in self.store.patches(project["id"], status="annotated", order="annotated")]
        name = args.name or re.sub(r"[^A-Za-z0-9_+\- ()]+", "-", f"{project['name']} (bioadapt v{version['number']})")
        metadata = {"name": name, "authors": args.authors or [caller.id], "license": args.license,
                    "description": args.description or f"{project['model_info'].get('name', 'model')} fine-tuned "
                    f"with bioadapt on {len(trained)} corrected patches (project {project['name']!r}, version "
                    f"{version['number']})."}
        folder = Path(project["folder"]) / "exports"
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / f"v{version['number']}-{time.strftime('%Y%m%d-%H%M%S')}.zip"
        record = {"params": version["params"], "result": version["metrics"].get("training", {})} \
            if version["number"] else None
        training = {"regions": trained, "metrics": version["metrics"].get("holdout", {})}
        path = Path(run_on_worker(project["model_source"], self._options(project), weights, "export", str(out),
                                  metadata, training, regions[0], record))
        answer = {"path": str(path), "version": version["number"], "size": path.stat().st_size}
        if args.return_bytes:
            if answer["size"] > MAX_RETURNED_EXPORT_BYTES:
                raise BioadaptError(f"the package has {answer['size']} bytes, over {MAX_RETURNED_EXPORT_BYTES}; "
                                    f"fetch it from {path}")
            answer["bytes"] = path.read_bytes()
        return answer


def _ref(row: dict[str, Any]) -> ImageRef:
    return ImageRef(row["uri"], row["axes"], tuple(row["channels"]) if row["channels"] else None)


def _mask(image: Any, mask: str | None) -> Any:
    from bioadapt.data.sampling import resolve_mask

    return resolve_mask(image, mask)


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
    return {k: row[k] for k in ("id", "uri", "axes", "channels", "mask", "shape", "spatial_axes", "created")}
