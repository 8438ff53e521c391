"""Export: a model version written as a bioimage.io package (format 0.5) by an actor holding its weights, with
the training regions recorded and fresh test tensors from an annotated patch; the package passes
bioimageio.core's test and stays in the project's folder (the job's output ``package``)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bioadapt.data import LabelledRegion
from bioadapt.errors import BioadaptError
from bioadapt.service import schemas as s

if TYPE_CHECKING:
    from bioadapt.service.api import BioadaptService, Caller
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


def submit(service: "BioadaptService", caller: "Caller", args: s.ExportModel,
           progress: Callable[[dict], Any] | None = None) -> dict[str, Any]:
    project = service.owned_project(caller, args.project_id)
    version = service.version(project, args.version)
    regions = service.regions(project, "train") or service.regions(project, "holdout")
    if not regions:
        raise BioadaptError("export needs one annotated patch for the package's test tensors: annotate a patch")
    images = {i["id"]: i for i in service.store.images(project["id"])}
    trained = [{"image": images[p["image_id"]]["uri"], "origin": p["origin"], "shape": p["shape"]}
               for p in service.store.patches(project["id"], status="annotated", order="annotated")]
    name = args.name or re.sub(r"[^A-Za-z0-9_+\- ()]+", "-", f"{project['name']} (bioadapt v{version['number']})")
    metadata = {"name": name, "authors": args.authors or [caller.id], "license": args.license,
                "description": args.description or f"{project['model_info'].get('name', 'model')} fine-tuned "
                f"with bioadapt on {len(trained)} corrected patches (project {project['name']!r}, version "
                f"{version['number']})."}
    record = {"params": version["params"], "result": version["metrics"].get("training", {})} \
        if version["number"] else None
    training = {"regions": trained, "metrics": version["metrics"].get("holdout", {})}
    runner = service.start_job("export", lambda job: _export(service, job, project, version, metadata, training,
                                                             regions[0], record), caller, project, progress)
    return {"job_id": runner.job.id, "version": version["number"]}


def _export(service: "BioadaptService", runner: "JobRunner", project: dict[str, Any], version: dict[str, Any],
            metadata: dict[str, Any], training: dict[str, Any], test_region: LabelledRegion,
            record: dict[str, Any] | None) -> dict[str, Any]:
    from bioadapt.service.execution import run_body

    folder = Path(project["folder"]) / "exports"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"v{version['number']}-{time.strftime('%Y%m%d-%H%M%S')}-{runner.job.id}.zip"
    spec = service.model_spec(project, version)
    actors = service.pool.lease(spec, 1, cancelled=runner.cancelled)
    if not actors:
        return {"version": version["number"]}
    healthy = False
    try:
        path = Path(run_body(runner, actors[0], export_package, str(out), metadata, training, test_region, record,
                             what="export"))
        healthy = True
    finally:
        service.pool.release(spec, actors, healthy=healthy)
    return {"path": str(path), "version": version["number"], "size": path.stat().st_size,
            "outputs": {"package": str(path)}}
