"""Ranking stability of MC-dropout patch scores: the Spearman correlation of a pool's scores between two round
seeds, for each dropout kind (channel / element), rate p and number of passes T.

The pools and base model are the label-efficiency benchmark's (benchmarks/al_data.py). For each setting the
pool is scored twice (seeds 0 and 1) with T = 32 passes; with common random numbers the first T' passes of a
32-pass round are exactly a T'-pass round, so T = 4, 8 and 16 come from the same samples. Scores are the
service's: BALD per pixel (``bald``) reduced by ``patch_score`` ("mean" and "object_mean"). Also printed: the
top-16 overlap between the seeds, and the Spearman correlation of the mean-BALD score with the patch's
ground-truth foreground fraction (how much the score just measures how crowded a patch is).

    python benchmarks/bench_ranking.py
Appends each row to benchmarks/results/ranking.jsonl; writes ranking.json and ranking.md from every row there.
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
from al_data import DATASETS, base_model, load_dataset  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def pool_scores(adapter, dataset, passes: int, seed: int, labels: list[np.ndarray]) -> dict[str, np.ndarray]:
    """{(reduce, T): scores} for T in 4, 8, 16, ``passes``, from one ``passes``-pass round."""
    from bioadapt.active import bald, patch_score

    out: dict[str, list[float]] = {}
    activation = adapter.describe().activation
    for index in range(len(dataset.windows)):
        pixels, _ = dataset.patch(index)
        samples = adapter.mc_proba(pixels[None], passes=passes, seed=seed)[:, 0]
        for t in sorted({4, 8, 16, passes}):
            score_map = bald(samples[:t], activation=activation)
            for reduce in ("mean", "object_mean"):
                out.setdefault(f"{reduce} T={t}", []).append(patch_score(score_map, reduce=reduce,
                                                                         labels=labels[index]))
    return {key: np.array(values) for key, values in out.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--kinds", default="channel,element")
    parser.add_argument("--rates", default="0.05,0.1,0.2")
    parser.add_argument("--passes", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--report", action="store_true", help="only write ranking.md from ranking.jsonl")
    args = parser.parse_args(argv)
    if args.report:
        rows = [json.loads(line) for line in (RESULTS / "ranking.jsonl").read_text().splitlines() if line.strip()]
        result = {"rows": rows, "command": "python benchmarks/bench_ranking.py (rows of several runs, see README)",
                  "date": time.strftime("%Y-%m-%d %H:%M"), "minutes": "-"}
        (RESULTS / "ranking.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "ranking.md").write_text(table(rows, result))
        print(table(rows, result))
        return result
    import torch

    from bioadapt.adapters import load_adapter

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bioadapt-ranking-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        model = base_model(workdir)
        for name in args.datasets.split(","):
            dataset = load_dataset(name, workdir)
            foreground = dataset.foreground_fraction()
            plain = load_adapter(model, device="cpu")
            labels = [plain.segment(dataset.patch(i)[0][None])[0] for i in range(len(dataset.windows))]
            for kind in args.kinds.split(","):
                for rate in [float(r) for r in args.rates.split(",")]:
                    adapter = load_adapter(model, device="cpu", dropout_p=rate, dropout_kind=kind)
                    first, second = (pool_scores(adapter, dataset, args.passes, seed, labels) for seed in (0, 1))
                    for key in first:
                        top_a, top_b = (set(np.argsort(-s)[:16].tolist()) for s in (first[key], second[key]))
                        row = {"dataset": name, "kind": kind, "p": rate, "score": key,
                               "spearman_between_seeds": round(spearman(first[key], second[key]), 3),
                               "top16_overlap": round(len(top_a & top_b) / 16, 3),
                               "spearman_with_foreground": round(spearman(first[key], foreground), 3),
                               "date": time.strftime("%Y-%m-%d")}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        with (RESULTS / "ranking.jsonl").open("a") as stream:  # kept as it comes: runs are long
                            stream.write(json.dumps(row) + "\n")
    result = {"rows": rows, "passes": args.passes,
              "minutes": round((time.perf_counter() - started) / 60, 1), "threads": args.threads,
              "load_average": [round(v, 2) for v in os.getloadavg()],
              "command": "python benchmarks/bench_ranking.py " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M")}
    rows = [json.loads(line) for line in (RESULTS / "ranking.jsonl").read_text().splitlines()]  # earlier runs too
    (RESULTS / "ranking.json").write_text(json.dumps(result | {"rows": rows}, indent=2) + "\n")
    (RESULTS / "ranking.md").write_text(table(rows, result))
    print(table(rows, result))
    return result


def table(rows: list[dict], result: dict) -> str:
    lines = [f"Ranking stability (made by `{result['command'].strip()}`, {result['date']}, {result['minutes']} min)",
             "", "Spearman of pool scores between round seeds 0 and 1 / top-16 overlap / Spearman with the "
             "foreground fraction:", "",
             "| date | data set | kind | p | score | Spearman seeds | top-16 overlap | Spearman foreground |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['date']} | {r['dataset']} | {r['kind']} | {r['p']} | {r['score']} "
                     f"| {r['spearman_between_seeds']:.3f} "
                     f"| {r['top16_overlap']:.2f} | {r['spearman_with_foreground']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
