"""Fine-tuning: the model trained on the project's annotated training patches on one actor (a whole GPU when
there is one), with live progress (epoch, loss) and a clean stop on cancel; the new weights become a new model
version, the earlier versions are never touched. Only the parameters the caller set are sent: the rest keep the
adapter's own defaults.

The same job judges the new version against its parent: the actor segments the held-out patches before it trains
(the parent's weights) and after (the version's), and ``holdout.verdict_of`` compares the two patch by patch. A
version worse than its parent beyond the noise of those patches (or empty where they hold objects) is kept and
listed, but never becomes the project's default for scoring, predict, export or the next fine-tune.

While fewer patches are held out than a verdict needs (``MIN_PATCHES``: the first 11 annotated patches at the
default share of a quarter), the job judges the version by cross-validation instead of leaving it undecided: a few
extra fine-tunes from the same parent, each leaving out a different share of the training patches the parent never
trained on (and training on the held-out ones), so that each such patch is segmented by a fine-tune that did not
train on it. The verdict then compares those segmentations and the version's on the held-out patches with the
parent's: it judges fine-tuning on this many labels, of which the version is one draw. The extra fine-tunes'
weights are thrown away; the version itself never trains on a held-out patch."""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bioadapt.data import LabelledRegion
from bioadapt.errors import BioadaptError
from bioadapt.service import schemas as s
from bioadapt.service.context import Caller, ServiceContext
from bioadapt.service.holdout import combined, cross_validation_folds, evaluate_regions, verdict_of
from bioadapt.service.jobs import JobRunner


@dataclass(frozen=True)
class FineTuneRequest:
    regions: tuple[LabelledRegion, ...]  # the corrected patches, read by the worker
    params: dict[str, Any] = field(default_factory=dict)
    holdout: tuple[LabelledRegion, ...] = ()  # the held-out patches both the parent and the version segment
    # cross-validation: per extra fine-tune, the indices of the training patches it leaves out (it trains on the
    # others and on the held-out ones); empty: judged on the held-out patches alone
    folds: tuple[tuple[int, ...], ...] = ()
    # per training patch, whether the parent (or an ancestor) trained on it: a fine-tune chooses its best epoch on
    # the others, where the parent's score is not an in-sample one; empty: any patch
    parent_trained_on: tuple[bool, ...] = ()

    def unseen(self, among: Sequence[int]) -> list[int]:
        """Positions in ``among`` (indices of training patches) of the patches the parent never trained on."""
        return [k for k, i in enumerate(among) if not (self.parent_trained_on and self.parent_trained_on[i])]


def fine_tune_on(adapter: Any, request: FineTuneRequest, *, stop: threading.Event,
                 progress: Callable[..., None]) -> dict[str, Any]:
    """The worker body: the parent's held-out metrics, the cross-validation's extra fine-tunes when the request
    has folds, training on the corrected regions, the version's held-out metrics; returns the training's result,
    the new weights and the evaluations."""
    import torch

    def evaluated(regions: tuple[LabelledRegion, ...], phase: str) -> dict[str, Any] | None:
        if not regions or stop.is_set():
            return None
        return evaluate_regions(adapter, regions, stop=stop, progress=lambda **done: progress(phase=phase, **done))

    parent = evaluated(request.holdout, "evaluating the parent on the held-out patches")  # the actor holds it
    samples = [region.read() for region in request.regions]
    folds = _cross_validated(adapter, request, samples, stop=stop, progress=progress) if request.folds else None
    result = adapter.fine_tune(samples, request.params, progress=lambda info: progress(phase="training", **info),
                               stop=stop.is_set, validate_on=request.unseen(range(len(samples))))
    version = evaluated(request.holdout, "evaluating the new version on the held-out patches")
    buffer = io.BytesIO()
    torch.save(adapter.state_dict(), buffer)
    cross_validation = None
    if folds is not None and not stop.is_set():
        cross_validation = {"folds": len(request.folds) + bool(request.holdout),
                            "training": folds["training"], "judged_training_patches": folds["judged"],
                            "parent": combined([folds["parent"]] + ([parent] if parent else [])),
                            "version": combined([folds["version"]] + ([version] if version else []))}
    return {"result": result.to_dict(), "weights": buffer.getvalue(), "parent_holdout": parent, "holdout": version,
            "cross_validation": cross_validation}


def _cross_validated(adapter: Any, request: FineTuneRequest, samples: list[Any], *, stop: threading.Event,
                     progress: Callable[..., None]) -> dict[str, Any] | None:
    """The extra fine-tunes of a cross-validation, each from the parent's weights: every training patch of a fold
    segmented by the parent and by the fine-tune that left it out (in the order of ``request.regions``); the actor
    holds the parent's weights again afterwards."""
    parent_weights = adapter.state_dict()
    held_out = [region.read() for region in request.holdout]
    judged = sorted(i for fold in request.folds for i in fold)  # training patches the parent never trained on
    parent = evaluate_regions(adapter, [request.regions[i] for i in judged], stop=stop,
                              progress=lambda **done: progress(phase="evaluating the parent on the training "
                                                                     "patches it never trained on", **done))
    per_patch: dict[int, Any] = {}
    training = []
    for number, fold in enumerate(request.folds, start=1):
        if stop.is_set():
            return None
        phase = f"cross-validating: fine-tune {number} of {len(request.folds)}"
        left_out = set(fold)
        kept = [i for i in range(len(samples)) if i not in left_out]
        unseen = request.unseen(kept) + list(range(len(kept), len(kept) + len(held_out)))  # held out: never trained
        trained = adapter.fine_tune([samples[i] for i in kept] + held_out, request.params,
                                    progress=lambda info: progress(phase=phase, **info), stop=stop.is_set,
                                    validate_on=unseen)
        training.append({"left_out": list(fold), "best_epoch": trained.best_epoch,
                         "epochs_run": trained.epochs_run, "seconds": trained.seconds})
        if stop.is_set():
            adapter.load_state_dict(parent_weights)
            return None
        segmented = evaluate_regions(adapter, [request.regions[i] for i in fold], stop=stop,
                                     progress=lambda **done: progress(phase=phase, **done))
        per_patch.update(zip(fold, segmented["per_patch"]))
        adapter.load_state_dict(parent_weights)
    if stop.is_set() or len(per_patch) < len(judged) or len(parent["per_patch"]) < len(judged):
        return None
    return {"parent": parent, "version": combined([{**parent, "per_patch": [per_patch[i] for i in judged]}]),
            "training": training, "judged": judged}


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
    seen = {p["id"] for p in context.trained_patches(project, base["number"])}
    parent_trained_on = tuple(p["id"] in seen for p in patches)
    folds = folds_for(parent_trained_on, len(holdout), project["holdout_fraction"]) if args.cross_validate else []
    request = FineTuneRequest(tuple(regions), params, tuple(holdout), tuple(tuple(f) for f in folds),
                              parent_trained_on)
    runner = context.start_job("fine_tune", lambda job: _fine_tune(context, job, project, base, request, trained_on),
                               caller, project, progress)
    return {"job_id": runner.job.id, "patches": len(regions), "holdout_patches": len(holdout),
            "cross_validation_fine_tunes": len(folds), "base_version": base["number"]}


def folds_for(parent_trained_on: Sequence[bool], held_out: int, holdout_fraction: float) -> list[list[int]]:
    """The cross-validation's extra fine-tunes (per fine-tune, the indices of the training patches it leaves out)
    while the held-out patches are too few for a verdict. Only training patches the parent never trained on
    (``parent_trained_on``: per training patch, whether the parent or an ancestor of it did) are left out and
    judged: on the others the parent's score is an in-sample one, and every extra fine-tune starts from weights that
    learnt them. As many folds as the project's held-out share makes (a quarter: 4; none: 4), one of them the
    held-out patches; none where the patches that can judge are too few however they are split."""
    from bioadapt.active.verdict import MIN_PATCHES

    unseen = [i for i, trained in enumerate(parent_trained_on) if not trained]
    if held_out >= MIN_PATCHES or len(unseen) + held_out < MIN_PATCHES:
        return []
    folds = max(2, round(1 / holdout_fraction)) if holdout_fraction > 0 else 4
    return [[unseen[i] for i in fold] for fold in cross_validation_folds(len(unseen), held_out, folds)]


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
        cross_validation = outcome.get("cross_validation")
        verdict = judged(outcome["parent_holdout"], outcome["holdout"], cross_validation)
        metrics = {"training": outcome["result"], "patches": len(request.regions), "verdict": verdict,
                   "holdout": outcome["holdout"], "parent_holdout": outcome["parent_holdout"],
                   "cross_validation": cross_validation}
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


def judged(parent: dict[str, Any] | None, version: dict[str, Any] | None,
           cross_validation: dict[str, Any] | None) -> dict[str, Any]:
    """The verdict: on the held-out patches, or, with a cross-validation, on those and the training patches the
    parent never trained on, as the parent and the fine-tune that left each out segmented them."""
    if not cross_validation:
        return verdict_of(parent, version)
    verdict = verdict_of(cross_validation["parent"], cross_validation["version"])
    folds, patches = cross_validation["folds"], cross_validation["parent"]["patches"]
    return {**verdict, "judged_by": "cross-validation", "folds": folds,
            "reason": f"cross-validated ({folds} fine-tunes from the parent, each judged on the annotated patches it "
                      f"did not train on, {patches} in all; too few are held out to judge this version alone): "
                      + verdict["reason"]}
