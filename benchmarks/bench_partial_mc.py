"""Partial-network MC against full MC: do the pool rankings (and the picked top 16) stay those of full MC, and how
much faster is it? The default depth of each model family is chosen from this table.

Pools: the real ones of the label-efficiency benchmark (benchmarks/al_data.py): DSB 2018 (upper half) and
BBBC039 (upper half of one field), 64 x 64 windows, here every ``--stride`` pixels (32: 105 and 140 windows; the
benchmark's own stride 16 gives 377 and 520, too many for a run under half an hour at T = 16 on the real U-Net).
Models: the demo's base U-Net (al_data.base_model: 8 features, depth 2, two ReLUs per stage, 10 dropout sites) and
the real pre-trained ``unet2d_nuclei_broad`` (its TorchScript's trained weights in this project's architecture,
tests/zoo_architectures; one ReLU per stage, 7 sites), whose fixed 512 x 512 input is declared here as any multiple
of 16 from 80 (the network is fully convolutional; the 64 x 64 windows then run at 128 x 128 with the halo of 32
instead of padded to 512 x 512, which would have cost 16x per pass).

Every window is scored by each way in turn (so the machine's load falls on all of them alike), T = ``--passes``,
element dropout p = 0.05 (the bioimage.io default): full MC with round seeds 0 and 1 (two full rankings: the
noise floor), head, and partial at each depth (round seed 0: the same masks as full seed 0 at the sites it keeps).
Scores: BALD reduced by ``mean`` and by ``object_mean`` (the default strategy's first-round score, with the base
model's deterministic segmentation). Printed and written: Spearman of each ranking with full seed 0, top-16
overlap, and the time per window against full's.

    nice -n 10 python benchmarks/bench_partial_mc.py
Writes benchmarks/results/partial_mc.json and partial_mc.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from al_data import PATCH, base_model, load_dataset  # noqa: E402

RESULTS = Path(__file__).parent / "results"
REDUCES = ("mean", "object_mean")
TOP = 16
RHO_TARGET = 0.9


def nuclei_broad(workdir: Path) -> Path:
    """unet2d_nuclei_broad with its real trained weights, its input declared as any multiple of 16 from 80."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from dataclasses import replace

    from zoo_corpus import BY_NAME, runnable

    def any_size(content: dict) -> None:
        for axis in content["inputs"][0]["axes"]:
            if axis.get("type") == "space":
                axis["size"] = {"min": 80, "step": 16}  # above twice the halo of 32

    description = replace(BY_NAME["nuclei-broad-state-dict"], name="nuclei-broad-any-size", edit=any_size)
    folder = workdir / "nuclei-broad"
    folder.mkdir(parents=True, exist_ok=True)
    rdf = folder / description.name / "bioimageio.yaml"
    return rdf if rdf.exists() else runnable(description, folder)


def windows(dataset, stride: int) -> list[int]:
    """Indices of al_data's 64 x 64 windows (every 16 pixels) that lie on a ``stride`` grid."""
    return [i for i, w in enumerate(dataset.windows) if w.origin[0] % stride == 0 and w.origin[1] % stride == 0]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def overlap(a: np.ndarray, b: np.ndarray, k: int = TOP) -> float:
    return len(set(np.argsort(-a)[:k].tolist()) & set(np.argsort(-b)[:k].tolist())) / k


def measure(model_name: str, source: Path, dataset, indices: list[int], depths: list[int], passes: int) -> dict:
    from bioadapt.active import bald, patch_score
    from bioadapt.adapters import load_adapter

    common = {"device": "cpu", "dropout_kind": "element", "dropout_p": 0.05}
    ways = {"full": load_adapter(source, mc_scope="full", **common),
            "head": load_adapter(source, mc_scope="head", **common)}
    sites = ways["full"].mc.patched_layers
    depths = [d for d in depths if d < sites]
    ways |= {f"partial d={d}": load_adapter(source, mc_scope="partial", mc_depth=d, **common) for d in depths}
    activation = ways["full"].describe().activation
    runs = [("full seed 1", "full", 1)] + [(name, name, 0) for name in ways]
    scores = {name: {r: [] for r in REDUCES} for name, _, _ in runs}
    seconds = {name: 0.0 for name, _, _ in runs}
    for index in indices:
        pixels, _ = dataset.patch(index)
        labels = ways["full"].segment(pixels[None])[0]
        for name, way, seed in runs:
            started = time.perf_counter()
            samples = ways[way].mc_proba(pixels[None], passes=passes, seed=seed)[:, 0]
            seconds[name] += time.perf_counter() - started
            score_map = bald(samples, activation=activation)
            for reduce in REDUCES:
                scores[name][reduce].append(patch_score(score_map, reduce=reduce, labels=labels))
    reference = {r: np.array(scores["full"][r]) for r in REDUCES}
    rows = []
    for name, _, _ in runs:
        if name == "full":
            continue
        row = {"model": model_name, "dataset": dataset.name, "way": name, "sites": sites,
               "seconds_per_window": round(seconds[name] / len(indices), 4),
               "speedup_over_full": round(seconds["full"] / seconds[name], 2)}
        for reduce in REDUCES:
            values = np.array(scores[name][reduce])
            row[f"spearman_{reduce}"] = round(spearman(values, reference[reduce]), 3)
            row[f"top{TOP}_{reduce}"] = round(overlap(values, reference[reduce]), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"model": model_name, "dataset": dataset.name, "windows": len(indices), "sites": sites,
            "full_seconds_per_window": round(seconds["full"] / len(indices), 4), "rows": rows}


def chosen_depth(results: list[dict], model: str) -> dict:
    """The smallest depth (the largest speed-up) whose object_mean and mean rankings keep Spearman >= 0.9 with full
    MC on every pool of ``model``."""
    candidates = {}
    for result in results:
        if result["model"] != model:
            continue
        for row in result["rows"]:
            if row["way"].startswith("partial"):
                ok = min(row["spearman_object_mean"], row["spearman_mean"]) >= RHO_TARGET
                depth = int(row["way"].split("=")[1])
                candidates.setdefault(depth, []).append((ok, row["speedup_over_full"]))
    passing = sorted(d for d, checks in candidates.items() if all(ok for ok, _ in checks))
    if not passing:
        return {"model": model, "depth": None}
    depth = passing[0]
    return {"model": model, "depth": depth,
            "speedups": [s for _, s in candidates[depth]]}


def markdown(results: list[dict], choices: list[dict], meta: dict) -> str:
    lines = ["# Partial-network MC against full MC", "",
             f"`{meta['command']}` ({meta['date']}, {meta['minutes']} min, torch threads {meta['threads']}, load "
             f"average {meta['load_average']}). T = {meta['passes']}, element dropout p = 0.05, 64 x 64 windows "
             f"every {meta['stride']} px of the pools of benchmarks/al_data.py. Spearman and top-{TOP} overlap of "
             "each way's pool ranking with full MC (round seed 0); `full seed 1` is full MC with other masks: the "
             "noise floor. Speed-up: time per window of full MC over the way's, measured window by window in turn.",
             "", "| model (sites) | pool (windows) | way | Spearman object_mean | top-16 object_mean | Spearman mean "
             "| top-16 mean | s / window | speed-up |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        lines.append(f"| {result['model']} ({result['sites']}) | {result['dataset']} ({result['windows']}) | full "
                     f"| 1 | 1 | 1 | 1 | {result['full_seconds_per_window']:.3f} | 1.0 |")
        for row in result["rows"]:
            lines.append(f"| | | {row['way']} | {row['spearman_object_mean']:.3f} | {row['top16_object_mean']:.2f} "
                         f"| {row['spearman_mean']:.3f} | {row['top16_mean']:.2f} | {row['seconds_per_window']:.3f} "
                         f"| {row['speedup_over_full']:.1f} |")
    lines += ["", f"Chosen depth per model (smallest depth with Spearman >= {RHO_TARGET} for both scores on every "
              "pool):", ""]
    for choice in choices:
        lines.append(f"- {choice['model']}: depth {choice['depth']}"
                     + (f", speed-ups {choice['speedups']}" if choice["depth"] else " (none passes)"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,nuclei_broad")
    parser.add_argument("--datasets", default="dsb2018,bbbc039")
    parser.add_argument("--depths", default="1,2,3,4,6")
    parser.add_argument("--passes", type=int, default=16)
    parser.add_argument("--stride", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="keeps the base models between runs (default: temporary)")
    parser.add_argument("--out", default="partial_mc")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="bioadapt-partial-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for model_name in args.models.split(","):
            source = base_model(workdir) if model_name == "demo" else nuclei_broad(workdir)
            for name in args.datasets.split(","):
                dataset = load_dataset(name, workdir)
                indices = windows(dataset, args.stride)
                depths = [int(d) for d in args.depths.split(",")]
                results.append(measure(model_name, source, dataset, indices, depths, args.passes))
    choices = [chosen_depth(results, model) for model in args.models.split(",")]
    meta = {"command": "python benchmarks/bench_partial_mc.py " + " ".join(argv or sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M"), "minutes": round((time.perf_counter() - started) / 60, 1),
            "threads": args.threads, "load_average": [round(v, 2) for v in os.getloadavg()],
            "passes": args.passes, "stride": args.stride, "patch": PATCH}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({**meta, "results": results, "chosen": choices}, indent=2)
                                              + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(results, choices, meta))
    print(markdown(results, choices, meta))


if __name__ == "__main__":
    main()
