"""Do the service's picks hold the base model's errors, and what would find them? (issue point: errors MC dropout
cannot see.)

``picks``: every patch the service picked in ``service_al.py``'s runs on a set (the rows' ``picks``), segmented by
the base model and matched against the ground truth at IoU 0.5: errors (false objects plus missed ones), true
objects and F1 per pick, by strategy and round; only the rounds whose picks the base model scored (the project's
default was still version 0: up to 16 labels, since versions below 12 labels are undecided), so these are errors
the strategy could have seen.
Random's picks are a sample of the pool, so the default's errors per pick against random's say whether it points
at what the labels should fix.

``rank``: the pool fields cut into non-overlapping 128 x 128 tiles; each tile scored as the scoring worker does
(T MC passes with the adapter's default scope and the round seed 0, BALD) and by cheaper signals of merged or
missed nuclei, then ranked: the errors in each score's top k tiles over k times the pool's mean (1.0: a random
pick; ``error_yield``) and Spearman's rho of score and errors. Scores: ``object_bald`` (BALD per object: the
default strategy's first-round score), ``bald`` (mean), ``disagreement`` (the readable map: how much the MC passes'
own objects disagree with the model's, per object); without MC: ``objects`` and ``foreground`` (the model's object
count and foreground share: crowding), ``nonconvex`` (the service's ``nonconvex`` score, bioadapt.active.shapes:
the model's objects of the pool's nucleus size with solidity below 0.9, since a merged pair of nuclei is not
convex) and ``large`` (objects above twice the pool's typical area: the median over its foreground pixels of
their object's area, so that the many tiny fragments a model may leave do not set it). Yields are given for all errors, for missed true objects (``fn``:
what merging and missing cost) and for false objects (``fp``).

    BIOADAPT_SHARED_DATA=... python benchmarks/pick_errors.py picks --dataset kromp \
        --runs benchmarks/results/service_al_kromp_nuclei_broad_valf1.jsonl
    BIOADAPT_SHARED_DATA=... python benchmarks/pick_errors.py rank --dataset kromp
Writes benchmarks/results/pick_errors_<dataset>.json (both parts, each when run) and pick_errors.md (every set).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from al_data import whole_fields  # noqa: E402
from service_al import base_package, paired_interval  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TILE = 128
TOPS = (2, 4, 8, 16)
SCORES = ("object_bald", "bald", "disagreement", "objects", "foreground", "nonconvex", "large")
KINDS = ("errors", "fn", "fp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("picks", "rank"))
    parser.add_argument("--dataset", default="kromp", choices=("bbbc039", "kromp", "usiigaci"))
    parser.add_argument("--runs", nargs="*", default=[], help="picks: service_al result files of that set")
    parser.add_argument("--passes", type=int, default=16, help="rank: MC passes (the service's default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="keeps the base model (default: temporary)")
    return parser.parse_args(argv)


def errors_of(labels: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    from bioadapt.active.metrics import match_instances

    match = match_instances(labels, truth, 0.5)
    true_objects = match.tp + match.fn
    return {"errors": match.fp + match.fn, "true_objects": true_objects, "fp": match.fp, "fn": match.fn,
            "f1": 2 * match.tp / (2 * match.tp + match.fp + match.fn) if true_objects + match.fp else None}


def crop(field: Any, origin: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    y, x = origin
    return (field.image[:, y:y + TILE, x:x + TILE].astype(np.float32), field.truth[y:y + TILE, x:x + TILE])


def pick_errors(adapter: Any, fields: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (strategy, seed, round) whose picks the base model scored (the project's default before the
    round was version 0): the base model's errors on each of that round's picks."""
    cache: dict[tuple, dict[str, Any]] = {}
    records, default_before = [], {}
    for row in sorted(rows, key=lambda r: (r["strategy"], r["seed"], r["labels"])):
        run = (row["strategy"], row["seed"])
        picked_by, default_before[run] = default_before.get(run, 0), row["default_version"]
        if not row.get("picks") or picked_by != 0:
            continue
        per_pick = []
        for name, origin, _ in row["picks"]:
            key = (name, *origin)
            if key not in cache:
                pixels, truth = crop(fields[name], tuple(origin))
                cache[key] = errors_of(adapter.segment(pixels[None])[0], truth)
            per_pick.append(cache[key])
        records.append({"strategy": row["strategy"], "seed": row["seed"], "labels": row["labels"],
                        "default_version": row["default_version"], "picks": per_pick})
    return records


def summarize_picks(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per strategy, over every pick up to each budget: mean errors, true objects and F1 per pick; and per seed the
    strategy's mean errors per pick minus random's (the same seed's pool), with its 95 % interval."""
    by_run: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in sorted(records, key=lambda r: r["labels"]):
        by_run.setdefault((record["strategy"], record["seed"]), []).append(record)
    budgets = sorted({r["labels"] for r in records})
    summary: dict[str, Any] = {}
    for strategy in sorted({s for s, _ in by_run}):
        rows = {}
        for budget in budgets:
            per_seed = {seed: [p for r in runs if r["labels"] <= budget for p in r["picks"]]
                        for (s, seed), runs in by_run.items() if s == strategy}
            picks = [p for ps in per_seed.values() for p in ps]
            if not picks:
                continue
            cell = {"picks": len(picks), "seeds": len(per_seed),
                    "errors": float(np.mean([p["errors"] for p in picks])),
                    "true_objects": float(np.mean([p["true_objects"] for p in picks])),
                    "fp": float(np.mean([p["fp"] for p in picks])), "fn": float(np.mean([p["fn"] for p in picks])),
                    "f1": float(np.nanmean([np.nan if p["f1"] is None else p["f1"] for p in picks]))}
            if strategy != "random":
                differences = [np.mean([p["errors"] for p in ps]) - np.mean(
                    [p["errors"] for r in by_run.get(("random", seed), []) if r["labels"] <= budget
                     for p in r["picks"]]) for seed, ps in per_seed.items() if ("random", seed) in by_run]
                cell["errors_minus_random"] = paired_interval([float(d) for d in differences])
            rows[budget] = cell
        summary[strategy] = rows
    return summary


def tiles(fields: list[Any]) -> list[tuple[str, tuple[int, int]]]:
    return [(f.name, (y, x)) for f in fields for y in range(0, f.truth.shape[0] - TILE + 1, TILE)
            for x in range(0, f.truth.shape[1] - TILE + 1, TILE)]


def tile_scores(adapter: Any, pixels: np.ndarray, passes: int) -> tuple[dict[str, float], np.ndarray]:
    """The tile's MC scores, and the model's objects (for the size and shape signals, scored once the pool's median
    object area is known)."""
    from bioadapt.active import bald, patch_score
    from bioadapt.active.maps import readable_map

    labels = adapter.segment(pixels[None])[0]
    samples = adapter.mc_proba(pixels[None], passes=passes, seed=0)
    score_map = bald(samples[:, 0], activation=adapter.describe().activation)
    pass_labels = adapter.segment_samples(samples)[:, 0]
    shown = readable_map("disagreement", score_map, labels, pass_labels)
    return ({"object_bald": patch_score(score_map, None, reduce="object_mean", labels=labels),
             "bald": float(score_map.mean()),
             "disagreement": patch_score(shown, None, reduce="object_mean", labels=labels)}, labels)


def shape_scores(labels: np.ndarray, typical_area: float) -> dict[str, float]:
    """Scores without MC passes, against the pool's typical area (``nonconvex``: ``rank`` adds the service's)."""
    from skimage.measure import regionprops

    regions = regionprops(labels)
    return {"objects": float(len(regions)), "foreground": float((labels > 0).mean()),
            "large": float(sum(r.area > 2 * typical_area for r in regions))}


def rank(adapter: Any, fields: list[Any], passes: int) -> dict[str, Any]:
    from scipy.stats import spearmanr

    from bioadapt.active.shapes import nonconvex_profile, pool_nonconvex

    by_name = {f.name: f for f in fields}
    rows, all_labels = [], []
    for done, (name, origin) in enumerate(tiles(fields), start=1):
        pixels, truth = crop(by_name[name], origin)
        scores, labels = tile_scores(adapter, pixels, passes)
        rows.append({"field": name, "origin": list(origin), **scores, **errors_of(labels, truth)})
        all_labels.append(labels)
        if done % 50 == 0:
            print(f"  {done} tiles", flush=True)
    areas = np.concatenate([np.bincount(labels.ravel())[1:] for labels in all_labels])
    areas = np.sort(areas[areas > 0])
    typical_area = float(np.repeat(areas, areas)[areas.sum() // 2]) if areas.size else 0.0  # pixel-weighted
    for row, labels in zip(rows, all_labels):
        row.update(shape_scores(labels, typical_area))
    for row, count in zip(rows, pool_nonconvex([nonconvex_profile(labels) for labels in all_labels])):
        row["nonconvex"] = count  # as the service selects: counted at the pool's nucleus size
    rng = np.random.default_rng(0)
    ranking = {}
    for score in SCORES:
        values = np.array([r[score] for r in rows], float)
        order = np.lexsort((rng.random(values.size), -values))  # ties at random: a flat score ranks as random
        ranking[score] = {}
        for kind in KINDS:
            counts = np.array([r[kind] for r in rows], float)
            ranking[score][kind] = {"spearman": float(spearmanr(values, counts)[0]),
                                    "yield": {k: float(counts[order[:k]].mean() / counts.mean()) for k in TOPS}}
    return {"tiles": len(rows), "mean": {kind: float(np.mean([r[kind] for r in rows])) for kind in KINDS},
            "typical_object_area": typical_area, "passes": passes, "ranking": ranking, "rows": rows}


def markdown(results: dict[str, dict[str, Any]]) -> str:
    lines = ["# Do the service's picks hold the base model's errors?", "",
             "`benchmarks/pick_errors.py` (its docstring says how each part ran). Errors: false objects plus missed "
             "ones at IoU 0.5, the base model's.", ""]
    for dataset, result in sorted(results.items()):
        if "picks" in result:
            picks = result["picks"]
            lines += [f"## {dataset}: the service's picks ({', '.join(picks['runs'])})", "",
                      "Every pick up to the budget, per pick: mean errors (false + missed objects) / true objects / base F1; the "
                      "strategy's "
                      "errors per pick minus random's, paired by seed.", "",
                      "| strategy | " + " | ".join(f"to {b}" for b in picks["budgets"]) + " |",
                      "| --- | " + " | ".join("---" for _ in picks["budgets"]) + " |"]
            for strategy, rows in picks["summary"].items():
                cells = []
                for budget in picks["budgets"]:
                    cell = rows.get(str(budget)) or rows.get(budget)
                    text = (f"{cell['errors']:.1f} ({cell['fp']:.1f} + {cell['fn']:.1f}) / "
                            f"{cell['true_objects']:.1f} / {cell['f1']:.2f}")
                    if "errors_minus_random" in cell:
                        interval = cell["errors_minus_random"]
                        text += f"; {interval['mean']:+.1f} [{interval['low']:+.1f}, {interval['high']:+.1f}]"
                    cells.append(text)
                lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
            lines.append("")
        if "rank" in result:
            ranked = result["rank"]
            mean = ranked["mean"]
            lines += [f"## {dataset}: which score ranks the errors ({ranked['tiles']} tiles of {TILE} px, T = "
                      f"{ranked['passes']}; per tile {mean['errors']:.1f} errors: {mean['fn']:.1f} missed, "
                      f"{mean['fp']:.1f} false; typical object {ranked['typical_object_area']:.0f} px)", "",
                      "Errors in each score's top k tiles over k random tiles' (1.0: random) for all errors, missed "
                      "true objects (fn) and false objects (fp); Spearman's rho of score and count.", "",
                      "| score | " + " | ".join(f"{kind} top {k}" for kind in KINDS for k in TOPS)
                      + " | " + " | ".join(f"rho {kind}" for kind in KINDS) + " |",
                      "| --- | " + " | ".join("---" for _ in KINDS for _ in TOPS) + " | "
                      + " | ".join("---" for _ in KINDS) + " |"]
            for score, values in ranked["ranking"].items():
                yields = [values[kind]["yield"] for kind in KINDS]
                lines.append(f"| {score} | " + " | ".join(f"{y.get(str(k), y.get(k)):.2f}" for y in yields
                                                          for k in TOPS)
                             + " | " + " | ".join(f"{values[kind]['spearman']:+.2f}" for kind in KINDS) + " |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from bioadapt.adapters import load_adapter

    torch.set_num_threads(args.threads)
    pool, _ = whole_fields(args.dataset)
    out = RESULTS / f"pick_errors_{args.dataset}.json"
    result = json.loads(out.read_text()) if out.exists() else {}
    with tempfile.TemporaryDirectory(prefix="bioadapt-pick-errors-") as tmp:
        adapter = load_adapter(base_package("nuclei_broad", Path(args.workdir or tmp)), device="cpu")
        started = time.perf_counter()
        if args.part == "picks":
            rows = [json.loads(line) for path in args.runs for line in Path(path).read_text().splitlines()]
            records = pick_errors(adapter, {f.name: f for f in pool}, [r for r in rows if r["base"] ==
                                                                      "nuclei_broad"])
            result["picks"] = {"runs": [Path(p).name for p in args.runs], "records": records,
                               "budgets": sorted({r["labels"] for r in records}),
                               "summary": summarize_picks(records)}
        else:
            result["rank"] = rank(adapter, pool, args.passes)
        result[f"{args.part}_seconds"] = round(time.perf_counter() - started, 1)
        result[f"{args.part}_date"] = time.strftime("%Y-%m-%d %H:%M")
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    results = {path.stem.removeprefix("pick_errors_"): json.loads(path.read_text())
               for path in sorted(RESULTS.glob("pick_errors_*.json"))}
    text = markdown(results)
    (RESULTS / "pick_errors.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
