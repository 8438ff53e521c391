"""Label efficiency: does annotating the patches BALD picks beat annotating random ones?

A base U-Net is trained briefly on synthetic 'nuclei' images (the demo's base model). The pool is a grid of
patches over a large synthetic image of another style ('crowded'), with ground truth; the test set is a
separate 'crowded' image. For each seed, the base model scores the whole pool through the service's scoring
code (``score_patches``: MC dropout, the acquisition map, the patch score); then, for each acquisition and
budget k, k patches are picked, "annotated" from the ground truth and the base model is fine-tuned on them with
the same settings (100 epochs, so larger budgets get more optimiser steps, as a user's training would;
``--steps N`` gives every budget the same compute instead; no validation split, so small budgets keep every
label), and F1 at IoU 0.5 is measured on the test set.

Acquisitions: BALD (top-k), BALD made diverse (``select_diverse``: score-weighted k-means over where a patch
sits and what it looks like, the most uncertain patch of each cluster), predictive entropy (top-k), random.

Small setting (the default, 3 seeds; 12 min on 2 cores):  python benchmarks/al_efficiency.py
Full setting (5 seeds; ~20 min):                         python benchmarks/al_efficiency.py --seeds 5
Equal compute per budget:
    python benchmarks/al_efficiency.py --steps 400 --out benchmarks/results/al_efficiency_fixed_steps
Writes benchmarks/results/al_efficiency.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
ACQUISITIONS = ("bald", "bald_diverse", "predictive_entropy", "random")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="2,4,8,16,32", help="labelled patches per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pool-size", type=int, default=1024, help="side of the pool image (grid of patches)")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--passes", type=int, default=8, help="MC-dropout passes when scoring")
    parser.add_argument("--epochs", type=int, default=100, help="epochs of every fine-tuning (compute grows "
                        "with the budget, as when a user trains for a set number of epochs)")
    parser.add_argument("--steps", type=int, default=None, help="instead of --epochs: optimiser steps of every "
                        "fine-tuning (the same compute for every budget)")
    parser.add_argument("--test-size", type=int, default=512, help="side of the test image (tiles of 128)")
    parser.add_argument("--base-epochs", type=int, default=40)
    parser.add_argument("--out", default=str(RESULTS / "al_efficiency"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from bioadapt.data import open_image, sample_patches
    from bioadapt.data.synthetic import synthetic_cells, write_synthetic_ome_zarr
    from bioadapt.demo import build_base_model
    from bioadapt.service.execution import ModelActor, ModelSpec

    args = parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bioadapt-al-") as tmp:
        root = Path(tmp)
        base = build_base_model(root / "base.zip", args.base_epochs, seed=0)
        write_synthetic_ome_zarr(root / "pool.ome.zarr", (args.pool_size, args.pool_size), "crowded", seed=11)
        pool_image = open_image(root / "pool.ome.zarr")
        truth = np.asarray(pool_image.label_image("ground_truth").read((0, 0), pool_image.spatial_shape)[0])
        windows = sample_patches(pool_image, None, (args.patch, args.patch), mode="grid")
        test = synthetic_cells((args.test_size, args.test_size), "crowded", seed=12)
        test_set = [(test.image[:, y:y + 128, x:x + 128].astype(np.float32), test.labels[y:y + 128, x:x + 128])
                    for y in range(0, args.test_size, 128) for x in range(0, args.test_size, 128)]
        worker = ModelActor(ModelSpec(str(base), {"device": "cpu"}))
        base_state = worker.adapter.state_dict()
        base_f1 = f1_on(worker.adapter, test_set)
        print(f"base model: F1 {base_f1:.3f} on {len(test_set)} test tiles; pool of {len(windows)} patches")
        runs = []
        for seed in range(args.seeds):
            scores = {name: pool_scores(worker, root / "pool.ome.zarr", windows, name, args.passes, seed)
                      for name in ("bald", "predictive_entropy")}
            descriptors = patch_descriptors(pool_image, windows, scores["bald"]["objects"])
            for budget in budgets:
                for acquisition in ACQUISITIONS:
                    chosen = pick(acquisition, scores, descriptors, budget, seed, len(windows))
                    samples = [(pool_image.read(windows[i].origin, windows[i].shape, dtype="float32"),
                                truth[windows[i].slices].astype(np.int64)) for i in chosen]
                    worker.adapter.load_state_dict(base_state)
                    epochs = max(1, round(args.steps / math.ceil(budget / 4))) if args.steps else args.epochs
                    result = worker.adapter.fine_tune(samples, {"epochs": epochs, "learning_rate": 3e-3,
                                                                "batch_size": 4, "val_fraction": 0.0,
                                                                "seed": seed})
                    f1 = f1_on(worker.adapter, test_set)
                    runs.append({"seed": seed, "budget": budget, "acquisition": acquisition, "f1": f1,
                                 "patches": chosen, "epochs": epochs, "seconds": round(result.seconds, 2)})
                    print(f"seed {seed} k={budget:>2} {acquisition:<18} F1 {f1:.3f}  ({result.seconds:.1f} s)")
    summary = summarize(runs, budgets, base_f1)
    summary.update({"command": "python benchmarks/al_efficiency.py " + " ".join(argv or []),
                    "settings": vars(args), "pool_patches": len(windows), "test_tiles": len(test_set),
                    "minutes": round((time.perf_counter() - started) / 60, 1), "date": time.strftime("%Y-%m-%d %H:%M"),
                    "runs": runs})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(summary))
    plot(summary, out.with_suffix(".png"))
    print(table(summary))
    return summary


def pool_scores(worker, image_path: Path, windows, acquisition: str, passes: int, seed: int) -> dict:
    """Every pool patch scored by the service's scoring code, in pool order."""
    from bioadapt.data import ImageRef
    from bioadapt.service.tasks.score import ScoreRequest, score_patches

    request = ScoreRequest(image=ImageRef(str(image_path)), patch_shape=windows[0].shape, passes=passes,
                           acquisition=acquisition, seed=seed)
    results = score_patches(worker.adapter, request, [(i, w.origin) for i, w in enumerate(windows)])
    by_id = {r["patch_id"]: r for r in results}
    return {"score": np.array([by_id[i]["score"] for i in range(len(windows))]),
            "objects": np.array([by_id[i]["objects"] for i in range(len(windows))])}


def patch_descriptors(image, windows, objects: np.ndarray) -> np.ndarray:
    """Where a patch sits (centre y, x) and what it looks like (mean, spread, objects the model finds)."""
    rows = []
    for window, count in zip(windows, objects):
        pixels = image.read(window.origin, window.shape, dtype="float32")
        centre = [o + s / 2 for o, s in zip(window.origin, window.shape)]
        rows.append([*centre, float(pixels.mean()), float(pixels.std()), float(count)])
    return np.array(rows)


def pick(acquisition: str, scores: dict, descriptors: np.ndarray, k: int, seed: int, n: int) -> list[int]:
    from bioadapt.active import select_diverse, select_top

    if acquisition == "random":
        return [int(i) for i in np.random.default_rng(1000 + seed).permutation(n)[:k]]
    if acquisition == "bald_diverse":
        return select_diverse(scores["bald"]["score"], descriptors, k, seed=seed)
    return select_top(scores[acquisition]["score"], k)


def f1_on(adapter, test_set) -> float:
    from bioadapt.active import match_instances, summarize_matches

    predicted = adapter.segment(np.stack([image for image, _ in test_set]))
    return float(summarize_matches([match_instances(p, t, 0.5) for p, (_, t) in zip(predicted, test_set)])["f1"])


def summarize(runs: list[dict], budgets: list[int], base_f1: float) -> dict:
    curves = {}
    for acquisition in ACQUISITIONS:
        curves[acquisition] = []
        for budget in budgets:
            values = [r["f1"] for r in runs if r["acquisition"] == acquisition and r["budget"] == budget]
            curves[acquisition].append({"budget": budget, "mean": float(np.mean(values)),
                                        "std": float(np.std(values)), "min": float(np.min(values)),
                                        "max": float(np.max(values)), "n": len(values)})
    random_means = [point["mean"] for point in curves["random"]]
    saved = {}
    for name in ("bald", "bald_diverse"):
        saved[name] = []
        for point in curves[name]:
            needed = random_budget_for(point["mean"], budgets, random_means)
            saved[name].append({"budget": point["budget"], "f1": point["mean"], "random_needs": needed,
                                "labels_saved": None if needed is None else round(needed - point["budget"], 1)})
    return {"base_f1": base_f1, "curves": curves, "labels_saved": saved}


def random_budget_for(f1: float, budgets: list[int], random_means: list[float]) -> float | None:
    """The smallest budget at which random selection's mean F1 reaches ``f1`` (linear between measured
    budgets); None when it never does within the budgets measured."""
    for i, mean in enumerate(random_means):
        if mean >= f1:
            if i == 0:
                return float(budgets[0])
            lo, hi = random_means[i - 1], mean
            fraction = (f1 - lo) / (hi - lo) if hi > lo else 1.0
            return float(budgets[i - 1] + fraction * (budgets[i] - budgets[i - 1]))
    return None


def table(summary: dict) -> str:
    curves = summary["curves"]
    budgets = [p["budget"] for p in curves["random"]]
    lines = [f"F1 at IoU 0.5 on the test set (mean ± std over seeds); base model {summary['base_f1']:.3f}", "",
             "| acquisition | " + " | ".join(f"k={b}" for b in budgets) + " |",
             "| --- |" + " --- |" * len(budgets)]
    for name, points in curves.items():
        lines.append(f"| {name} | " + " | ".join(f"{p['mean']:.3f} ± {p['std']:.3f}" for p in points) + " |")
    lines += ["", "Labels random selection needs to match each budget's mean F1 (labels saved = that - k):", "",
              "| acquisition | " + " | ".join(f"k={b}" for b in budgets) + " |", "| --- |" + " --- |" * len(budgets)]
    for name, points in summary["labels_saved"].items():
        cells = [f"{p['random_needs']:.1f} ({p['labels_saved']:+.1f})" if p["random_needs"] is not None
                 else f"> {budgets[-1]}" for p in points]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for name, points in summary["curves"].items():
        budgets = [p["budget"] for p in points]
        mean = np.array([p["mean"] for p in points])
        axis.plot(budgets, mean, marker="o", label=name)
        axis.fill_between(budgets, [p["min"] for p in points], [p["max"] for p in points], alpha=0.15)
    axis.axhline(summary["base_f1"], color="grey", linestyle="--", label="base model")
    axis.set_xscale("log", base=2)
    axis.set_xticks([p["budget"] for p in summary["curves"]["random"]])
    axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.set_xlabel("labelled patches")
    axis.set_ylabel("F1 at IoU 0.5 (test set)")
    axis.set_title(f"label efficiency, {summary['settings']['seeds']} seeds (band: min-max)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
