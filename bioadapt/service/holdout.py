"""Held-out evaluation, shared by the evaluate and fine_tune tasks: the worker body that segments the held-out
annotated patches (F1 and AP at IoU 0.5 pooled over the patches for instance models, mean Dice for semantic ones,
and the same per patch), the verdict on a version against its parent from two such evaluations, and the folds that
judge a version by cross-validation while too few patches are held out."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bioadapt.data import LabelledRegion
from bioadapt.errors import BioadaptError


def evaluate_regions(adapter: Any, regions: Sequence[LabelledRegion], *, stop: threading.Event | None = None,
                     progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """The worker body: the model's segmentation of each region against its labels, pooled and per patch
    (``per_patch``: (tp, fp, fn) for instance models; (Dice, predicts foreground, labels hold foreground) for
    semantic ones), so that two versions can be compared patch by patch (``verdict_of``)."""
    from bioadapt.active.metrics import dice, match_instances, summarize_matches

    if not regions:
        raise BioadaptError("nothing to evaluate: no held-out annotated patches yet; annotate more patches")
    instances = adapter.describe().instances  # the adapter's own targets say (affinities give instances too)
    matches, per_patch = [], []
    for done, region in enumerate(regions, start=1):
        if stop is not None and stop.is_set():
            break
        pixels, truth = region.read()
        predicted = adapter.segment(pixels[None])[0]
        if instances:
            match = match_instances(predicted, truth, 0.5)
            matches.append(match)
            per_patch.append([match.tp, match.fp, match.fn])
        else:
            per_patch.append([dice(predicted, truth), bool((predicted > 0).any()), bool((truth > 0).any())])
        if progress is not None:
            progress(done=done, total=len(regions))
    if instances and not matches:  # stopped before the first patch
        return {"metric": "f1@0.5", "f1": None, "ap": None, "patches": 0, "per_patch": []}
    if instances:
        summary = summarize_matches(matches)
        return {"metric": "f1@0.5", "f1": summary["f1"], "ap": summary["ap"], "tp": summary["tp"],
                "fp": summary["fp"], "fn": summary["fn"], "patches": len(matches), "per_patch": per_patch}
    return {"metric": "dice", "dice": float(np.mean([p[0] for p in per_patch])) if per_patch else None,
            "patches": len(per_patch), "per_patch": per_patch}


def cross_validation_folds(train: int, held_out: int, folds: int) -> list[list[int]]:
    """The training patches (indices, oldest annotation first) that each extra fine-tune of a cross-validation
    leaves out: ``folds`` folds over every annotated patch, the held-out patches being one of them (the version's
    own), the training patches dealt round-robin to the others so that each fold mixes rounds. Every fine-tune
    keeps at least one patch to train on; [] where that is impossible (a single annotated patch)."""
    others = min(folds - 1 if held_out else folds, train)
    if others < 1 or (not held_out and train < 2):
        return []
    return [list(range(j, train, others)) for j in range(others)]


def combined(evaluations: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several ``evaluate_regions`` results of one metric as one: their patches in order, pooled again."""
    from bioadapt.active.verdict import pooled_f1

    per_patch = [row for evaluation in evaluations for row in evaluation["per_patch"]]
    metric = evaluations[0]["metric"]
    if metric == "dice":
        return {"metric": "dice", "dice": float(np.mean([p[0] for p in per_patch])) if per_patch else None,
                "patches": len(per_patch), "per_patch": per_patch}
    counts = np.asarray(per_patch, np.int64).reshape(-1, 3)
    tp, fp, fn = (int(v) for v in counts.sum(0))
    return {"metric": metric, "f1": pooled_f1(counts), "tp": tp, "fp": fp, "fn": fn, "patches": len(per_patch),
            "per_patch": per_patch}


def verdict_of(parent: dict[str, Any] | None, version: dict[str, Any] | None) -> dict[str, Any]:
    """The version against its parent (``evaluate_regions`` results on the same held-out patches), as
    ``bioadapt.active.verdict`` judges it; undecided, saying why, without held-out patches."""
    from bioadapt.active.verdict import judge_dice, judge_instances

    if not parent or not version or not parent.get("per_patch"):
        return {"verdict": "undecided", "reason": "no held-out patches to judge it on yet: annotate more patches "
                "(a share of them is held out); until then this version is used only when named",
                "metric": (version or {}).get("metric"), "patches": 0}
    if parent["metric"] == "dice":
        judged = judge_dice(*zip(*[(p[0], v[0], p[1], v[1], p[2]) for p, v in zip(parent["per_patch"],
                                                                                  version["per_patch"])]))
    else:
        judged = judge_instances(parent["per_patch"], version["per_patch"])
    return judged.to_dict()


def score_of(metrics: dict[str, Any] | None) -> float | None:
    """The one number a held-out evaluation is judged by: F1 for instance models, Dice for semantic ones."""
    if not metrics:
        return None
    return metrics.get("dice") if metrics.get("metric") == "dice" else metrics.get("f1")


def learning_curve(versions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The project's learning curve: one row per fine-tuned version with the training labels it learnt from (its
    parent's count beside it), its held-out score and its parent's on the same held-out patches when it was made,
    and the verdict with its reason. Rows of different versions may rest on different held-out patches (the set
    grows with the labels); each row's two scores share theirs. A version judged by cross-validation
    (``judged_by``) has both scores from the held-out patches and the training patches its parent never trained
    on, each segmented by a fine-tune that left it out."""
    labels = {v["number"]: len(v["trained_on"]) if v.get("trained_on") is not None else
              int(v["metrics"].get("patches", 0)) for v in versions}
    rows = []
    for version in versions:
        if not version["number"]:
            continue
        metrics = version["metrics"]
        verdict = metrics.get("verdict") or {}
        crossed = metrics.get("cross_validation") or {}  # then both scores are the cross-validation's
        rows.append({"version": version["number"], "parent": version["parent"],
                     "labels": labels[version["number"]], "parent_labels": labels.get(version["parent"], 0),
                     "metric": verdict.get("metric") or (metrics.get("holdout") or {}).get("metric"),
                     "score": score_of(crossed.get("version") or metrics.get("holdout")),
                     "parent_score": score_of(crossed.get("parent") or metrics.get("parent_holdout")),
                     "judged_by": verdict.get("judged_by") or "held-out patches",
                     "holdout_patches": verdict.get("patches", 0), "verdict": version.get("verdict") or "undecided",
                     "reason": verdict.get("reason", "judged before verdicts were recorded")})
    return rows
