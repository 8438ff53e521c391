"""Fine-tuning: the model trained on the project's annotated training patches on one actor (a whole GPU when
there is one), with live progress (epoch, loss) and a clean stop on cancel; the new weights become a new model
version, the earlier versions are never touched. Only the parameters the caller set are sent: the rest keep the
adapter's own defaults.

The same job judges the new version against its parent: the actor segments the held-out patches before it trains
(the parent's weights) and after (the version's), and ``holdout.verdict_of`` compares the two patch by patch. A
version worse than its parent beyond the noise of those patches (or empty where they hold objects) is kept and
listed, but never becomes the project's default for scoring, predict, export or the next fine-tune."""

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
from bioadapt.service.holdout import evaluate_regions, verdict_of
from bioadapt.service.jobs import JobRunner


@dataclass(frozen=True)
class FineTuneRequest:
    regions: tuple[LabelledRegion, ...]  # the corrected patches, read by the worker
    params: dict[str, Any] = field(default_factory=dict)
    holdout: tuple[LabelledRegion, ...] = ()  # the held-out patches both the parent and the version segment


def fine_tune_on(adapter: Any, request: FineTuneRequest, *, stop: threading.Event,
                 progress: Callable[..., None]) -> dict[str, Any]:
    """The worker body: the parent's held-out metrics, training on the corrected regions, the version's held-out
    metrics; returns the training's result, the new weights and both evaluations."""
    import torch

    def evaluated(phase: str) -> dict[str, Any] | None:
        if not request.holdout or stop.is_set():
            return None
        return evaluate_regions(adapter, request.holdout, stop=stop,
                                progress=lambda **done: progress(phase=phase, **done))

    parent = evaluated("evaluating the parent on the held-out patches")  # the actor holds the parent's weights
    samples = [region.read() for region in request.regions]
    result = adapter.fine_tune(samples, request.params, progress=lambda info: progress(phase="training", **info),
                               stop=stop.is_set)
    version = evaluated("evaluating the new version on the held-out patches")
    buffer = io.BytesIO()
    torch.save(adapter.state_dict(), buffer)
    return {"result": result.to_dict(), "weights": buffer.getvalue(), "parent_holdout": parent, "holdout": version}


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
    holdout = context.regions(project, "holdout")
    trained_on = [p["id"] for p in patches]
    runner = context.start_job("fine_tune", lambda job: _fine_tune(context, job, project, base, FineTuneRequest(
        tuple(regions), params, tuple(holdout)), trained_on), caller, project, progress)
    return {"job_id": runner.job.id, "patches": len(regions), "holdout_patches": len(holdout),
            "base_version": base["number"]}


def _fine_tune(context: ServiceContext, runner: JobRunner, project: dict[str, Any], base: dict[str, Any],
               request: FineTuneRequest, trained_on: list[int]) -> dict[str, Any]:
    """Reserve the version's number first (with the patches it trains on), train, then make it ready; a job
    that does not get that far leaves its number failed, never usable."""
    from bioadapt.service.execution import run_body

    number = context.store.reserve_version(project["id"], base["number"], request.params, trained_on,
                                           runner.job.id)
    runner.report(version=number)
    ready = False
    try:
        spec = context.model_spec(project, base)
        actors = context.pool.lease(spec, 1, kind="fine_tune", cancelled=runner.cancelled)
        if not actors:
            return {"result": None, "version": None}
        try:
            outcome = run_body(runner, actors[0], fine_tune_on, request, what="fine-tuning")
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
        verdict = verdict_of(outcome["parent_holdout"], outcome["holdout"])
        metrics = {"training": outcome["result"], "patches": len(request.regions), "verdict": verdict,
                   "holdout": outcome["holdout"], "parent_holdout": outcome["parent_holdout"]}
        ready = context.store.finish_version(project["id"], number, str(path), metrics, verdict["verdict"])
        if not ready:
            path.unlink(missing_ok=True)
            raise BioadaptError(f"version {number} was given up while it trained (its project was deleted, or its "
                                "job was taken for interrupted)")
        default = context.store.version(project["id"])["number"]
        return {"result": outcome["result"], "version": number, "parent": base["number"], "path": str(path),
                "verdict": verdict, "default_version": default}
    finally:
        if not ready:
            context.store.fail_versions([runner.job.id])
