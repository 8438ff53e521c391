"""Do the patch scores point at the base model's errors? For each pool of the label-efficiency benchmark
(benchmarks/al_data.py), the base model scores every patch through the service's scoring worker (T = 16, round
seed 0) with mean BALD (``bald``) and BALD per object (``object_bald``: the default strategy's first-round score),
and segments it; against the ground truth each patch gets its F1 at IoU 0.5, its number of true and predicted
objects and its foreground fraction. Printed and written: the Spearman correlation of each score with each of
these, and their medians over the 8 top-scored patches against the pool's. A score that finds errors correlates
negatively with the patch F1.

    python benchmarks/bench_score_errors.py
Writes benchmarks/results/score_errors.json and score_errors.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from al_data import DATASETS  # noqa: E402
from al_efficiency import Bench, parse_args  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SCORES = ("bald", "object_bald")
TOP = 8


def patch_table(bench: Bench) -> dict[str, np.ndarray]:
    """Per pool patch: the base model's F1 (NaN where neither truth nor prediction holds an object), true and
    predicted object counts, foreground fraction."""
    from bioadapt.active import f1_score

    rows = []
    for index in range(len(bench.dataset.windows)):
        pixels, truth = bench.dataset.patch(index)
        labels = bench.worker.adapter.segment(pixels[None])[0]
        true_n, predicted_n = len(np.unique(truth)) - 1, len(np.unique(labels)) - 1
        f1 = f1_score(labels, truth, 0.5) if true_n or predicted_n else np.nan
        rows.append((f1, true_n, predicted_n))
    f1, true_n, predicted_n = (np.array(column, dtype=np.float64) for column in zip(*rows))
    return {"patch_f1": f1, "true_objects": true_n, "predicted_objects": predicted_n,
            "foreground": bench.dataset.foreground_fraction()}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    keep = np.isfinite(a) & np.isfinite(b)
    return float(spearmanr(a[keep], b[keep])[0])


def measure(dataset: str, workdir: Path) -> dict:
    bench = Bench(parse_args(["run", "--dataset", dataset]), workdir)
    table = patch_table(bench)
    result = {"dataset": dataset, "pool": len(bench.dataset.windows), "base_f1": bench.base_f1,
              "pool_median": {key: float(np.nanmedian(values)) for key, values in table.items()}, "scores": {}}
    for strategy in SCORES:
        scores, _ = bench.score(strategy, seed=0)
        top = np.argsort(-scores)[:TOP]
        result["scores"][strategy] = {
            "spearman": {key: spearman(scores, values) for key, values in table.items()},
            f"top{TOP}_median": {key: float(np.nanmedian(values[top])) for key, values in table.items()}}
    return result


def markdown(results: list[dict]) -> str:
    keys = ("patch_f1", "true_objects", "predicted_objects", "foreground")
    lines = ["# Do the patch scores point at the base model's errors?", "",
             "Spearman correlation of each score with the base model's per-patch F1 (IoU 0.5), true and predicted "
             "object counts and foreground fraction over the pool; then medians over the "
             f"{TOP} top-scored patches against the pool's. `python benchmarks/bench_score_errors.py`.", "",
             "| data set | score | rho F1 | rho true objects | rho predicted objects | rho foreground | "
             f"top-{TOP} median F1 / true / predicted objects | pool median F1 / true / predicted |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        pool = result["pool_median"]
        for name, score in result["scores"].items():
            top = score[f"top{TOP}_median"]
            lines.append(f"| {result['dataset']} (base F1 {result['base_f1']:.3f}) | {name} | "
                         + " | ".join(f"{score['spearman'][k]:+.2f}" for k in keys)
                         + f" | {top['patch_f1']:.2f} / {top['true_objects']:.0f} / {top['predicted_objects']:.0f}"
                         + f" | {pool['patch_f1']:.2f} / {pool['true_objects']:.0f} / "
                         + f"{pool['predicted_objects']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="keeps the base model between runs (default: temporary)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="bioadapt-errors-") as tmp:
        for dataset in args.datasets.split(","):
            workdir = Path(args.workdir or tmp) / dataset
            workdir.mkdir(parents=True, exist_ok=True)
            results.append(measure(dataset, workdir) | {"date": time.strftime("%Y-%m-%d %H:%M")})
            print(json.dumps(results[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "score_errors.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "score_errors.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
