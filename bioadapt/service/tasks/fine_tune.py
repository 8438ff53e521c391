"""Fine-tuning: the model trained on the project's annotated training patches on one actor (a whole GPU when
there is one), with live progress (epoch, loss) and a clean stop on cancel; the new weights become a new model
version, the earlier versions are never touched. Only the parameters the caller set are sent: the rest keep the
adapter's own defaults."""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bioadapt.data import LabelledRegion
from bioadapt.errors import BioadaptError
from bioadapt.service import schemas as s
from bioadapt.service.context import Caller, ServiceContext
from bioadapt.service.jobs import JobRunner


@dataclass(frozen=True)
class FineTuneRequest:
    regions: tuple[LabelledRegion, ...]  # the corrected patches, read by the worker
    params: dict[str, Any] = field(default_factory=dict)


def fine_tune_on(adapter: Any, request: FineTuneRequest, *, stop: threading.Event,
                 progress: Callable[..., None]) -> dict[str, Any]:
    """The worker body: train on the corrected regions; returns the training's result and the new weights."""
    import torch

    samples = [region.read() for region in request.regions]
    result = adapter.fine_tune(samples, request.params, progress=lambda info: progress(**info), stop=stop.is_set)
    buffer = io.BytesIO()
    torch.save(adapter.state_dict(), buffer)
    return {"result": result.to_dict(), "weights": buffer.getvalue()}


def params_of(args: s.FineTune, kind: str) -> dict[str, Any]:
    """The adapter's parameters: ``args.params`` (checked against the schema of the model ``kind``) and the named
    ones the caller gave, nothing else: what the caller left out keeps the adapter's own default."""
    named = {name: getattr(args, name) for name in s.TUNED_BY_FINE_TUNE if getattr(args, name) is not None}
    return {**s.tuning_params(kind, args.params), **named}


def submit(context: ServiceContext, caller: Caller, args: s.FineTune,
           progress: Callable[[dict], Any] | None = None) -> dict[str, Any]:
    project = context.owned_project(caller, args.project_id)
    params = params_of(args, project["model_info"].get("kind", "bioimageio"))  # refused before anything else
    base = context.version(project, args.base_version)
    patches = context.annotated(project, "train")
    if not patches:
        raise BioadaptError("no annotated training patches yet: submit labels for some patches first (a share "
                            "of them is held out for evaluation)")
    regions = context.regions_of(project, patches)
    trained_on = [p["id"] for p in patches]
    runner = context.start_job("fine_tune", lambda job: _fine_tune(context, job, project, base, regions, trained_on,
                                                                   params), caller, project, progress)
    return {"job_id": runner.job.id, "patches": len(regions), "base_version": base["number"]}


def _fine_tune(context: ServiceContext, runner: JobRunner, project: dict[str, Any], base: dict[str, Any],
               regions: list[LabelledRegion], trained_on: list[int], params: dict[str, Any]) -> dict[str, Any]:
    """Reserve the version's number first (with the patches it trains on), train, then make it ready; a job
    that does not get that far leaves its number failed, never usable."""
    from bioadapt.service.execution import run_body

    number = context.store.reserve_version(project["id"], base["number"], params, trained_on, runner.job.id)
    runner.report(version=number)
    ready = False
    try:
        spec = context.model_spec(project, base)
        actors = context.pool.lease(spec, 1, kind="fine_tune", cancelled=runner.cancelled)
        if not actors:
            return {"result": None, "version": None}
        try:
            outcome = run_body(runner, actors[0], fine_tune_on, FineTuneRequest(tuple(regions), params),
                               what="fine-tuning")
        finally:
            context.pool.release(spec, actors, kind="fine_tune", healthy=False)  # its weights are not the spec's now
        if runner.cancelled.is_set():
            return {"result": outcome["result"], "version": None}
        folder = Path(project["folder"]) / "versions"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{uuid.uuid4().hex[:12]}.pt"
        partial = path.with_suffix(".partial")
        partial.write_bytes(outcome["weights"])
        partial.rename(path)
        ready = context.store.finish_version(project["id"], number, str(path),
                                             {"training": outcome["result"], "patches": len(regions)})
        if not ready:
            path.unlink(missing_ok=True)
            raise BioadaptError(f"version {number} was given up while it trained (its project was deleted, or its "
                                "job was taken for interrupted)")
        return {"result": outcome["result"], "version": number, "parent": base["number"], "path": str(path)}
    finally:
        if not ready:
            context.store.fail_versions([runner.job.id])
