"""Export: a model version written as a bioimage.io package (format 0.5) by an actor holding its weights, with
the training regions recorded and fresh test tensors from an annotated patch; the package passes
bioimageio.core's test and stays in the project's folder (the job's output ``package``)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bioadapt.data import LabelledRegion
from bioadapt.errors import BioadaptError
from bioadapt.service import schemas as s
from bioadapt.service.context import Caller, ServiceContext
from bioadapt.service.holdout import learning_curve
from bioadapt.service.jobs import JobRunner


def export_package(adapter: Any, out: str, metadata: dict[str, Any], training: dict[str, Any],
                   test_region: LabelledRegion | None = None, fine_tune_record: dict[str, Any] | None = None, *,
                   stop: threading.Event | None = None, progress: Callable[..., None] | None = None) -> str:
    """The worker body: write the model (with its current weights) as a package that passes the model test;
    ``fine_tune_record`` ({"params", "result"}) documents the training of weights loaded from a file."""
    from bioadapt.exporters import export_bioimageio

    if progress is not None:
        progress(stage="writing and testing the package")
    if fine_tune_record:
        adapter.record_training(fine_tune_record.get("params", {}), fine_tune_record.get("result", {}))
    training = dict(training)
    if test_region is not None:
        training["test_input"] = test_region.read()[0]
    return str(export_bioimageio(adapter, out, training=training, **metadata))


def submit(context: ServiceContext, caller: Caller, args: s.ExportModel,
           progress: Callable[[dict], Any] | None = None) -> dict[str, Any]:
    project = context.owned_project(caller, args.project_id)
    version = context.version(project, args.version)
    trained = context.trained_patches(project, version["number"])
    test_patches = trained or context.annotated(project, "train") or context.annotated(project, "holdout")
    if not test_patches:
        raise BioadaptError("export needs one annotated patch for the package's test tensors: annotate a patch")
    images = {i["id"]: i for i in context.store.images(project["id"])}
    regions = [{"image": images[p["image_id"]]["uri"], "origin": p["origin"], "shape": p["shape"]} for p in trained]
    name = args.name or re.sub(r"[^A-Za-z0-9_+\- ()]+", "-", f"{project['name']} (bioadapt v{version['number']})")
    model_name = project["model_info"].get("name", "model")
    what = (f"fine-tuned with bioadapt on {len(regions)} corrected patches" if version["number"] else
            "packaged by bioadapt as it was loaded (the base model, not fine-tuned)")
    metadata = {"name": name, "authors": args.authors or [caller.id], "license": args.license,
                "description": args.description or f"{model_name} {what} (project {project['name']!r}, version "
                f"{version['number']})."}
    record = {"params": version["params"], "result": version["metrics"].get("training", {})} \
        if version["number"] else None
    lineage = {row["number"] for row in context.store.lineage(project["id"], version["number"])}
    curve = [row for row in learning_curve(context.store.versions(project["id"])) if row["version"] in lineage]
    holdout = {k: v for k, v in (version["metrics"].get("holdout") or {}).items() if k != "per_patch"}
    training = {"regions": regions, "metrics": holdout, "learning_curve": curve}
    test_region = context.regions_of(project, test_patches[:1])[0]
    runner = context.start_job("export", lambda job: _export(context, job, project, version, metadata, training,
                                                             test_region, record), caller, project, progress)
    return {"job_id": runner.job.id, "version": version["number"]}


def _export(context: ServiceContext, runner: JobRunner, project: dict[str, Any], version: dict[str, Any],
            metadata: dict[str, Any], training: dict[str, Any], test_region: LabelledRegion,
            record: dict[str, Any] | None) -> dict[str, Any]:
    from bioadapt.service.execution import run_body

    folder = Path(project["folder"]) / "exports"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"v{version['number']}-{time.strftime('%Y%m%d-%H%M%S')}-{runner.job.id}.zip"
    spec = context.model_spec(project, version)
    actors = context.pool.lease(spec, 1, cancelled=runner.cancelled)
    if not actors:
        return {"version": version["number"]}
    healthy = False
    try:
        path = Path(run_body(runner, actors[0], export_package, str(out), metadata, training, test_region, record,
                             what="export"))
        healthy = True
    finally:
        context.pool.release(spec, actors, healthy=healthy)
    return {"path": str(path), "version": version["number"], "size": path.stat().st_size,
            "outputs": {"package": str(path)}}
