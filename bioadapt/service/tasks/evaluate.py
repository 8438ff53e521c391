"""Evaluation: model versions compared on the held-out annotated patches, each version on an actor holding its
weights: F1 and AP at IoU 0.5 pooled over the patches for instance models, mean Dice for semantic ones. The
metrics are stored with each version."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bioadapt.data import LabelledRegion
from bioadapt.errors import BioadaptError
from bioadapt.service import schemas as s
from bioadapt.service.context import Caller, ServiceContext
from bioadapt.service.holdout import evaluate_regions
from bioadapt.service.jobs import JobRunner


def submit(context: ServiceContext, caller: Caller, args: s.Evaluate,
           progress: Callable[[dict], Any] | None = None) -> dict[str, Any]:
    project = context.owned_project(caller, args.project_id)
    latest = context.store.versions(project["id"])[-1]["number"]  # undecided or worse: not the default
    numbers = args.versions or sorted({0, context.version(project, None)["number"], latest})
    versions = [context.version(project, number) for number in numbers]  # every one checked first
    regions = context.regions(project, "holdout")
    if not regions:
        raise BioadaptError("no held-out annotated patches: annotate more patches (a share of them, "
                            f"holdout_fraction={project['holdout_fraction']}, is kept for evaluation)")
    runner = context.start_job("evaluate", lambda job: _evaluate(context, job, project, versions, regions), caller,
                               project, progress)
    return {"job_id": runner.job.id, "versions": numbers, "patches": len(regions)}


def _evaluate(context: ServiceContext, runner: JobRunner, project: dict[str, Any],
              versions: list[dict[str, Any]], regions: list[LabelledRegion]) -> dict[str, Any]:
    from bioadapt.service.execution import run_body

    results = {}
    for index, version in enumerate(versions):
        if runner.cancelled.is_set():
            break
        runner.report(version=version["number"], versions_done=index, versions=len(versions))
        spec = context.model_spec(project, version)
        actors = context.pool.lease(spec, 1, cancelled=runner.cancelled)
        if not actors:
            break
        healthy = False
        try:
            metrics = run_body(runner, actors[0], evaluate_regions, regions, what="evaluation")
            healthy = True
        finally:
            context.pool.release(spec, actors, healthy=healthy)
        if runner.cancelled.is_set():
            break
        context.store.update_version_metrics(project["id"], version["number"], {"holdout": metrics})
        results[str(version["number"])] = metrics
    runner.report(versions_done=len(results))
    return {"versions": results, "holdout_patches": len(regions)}
