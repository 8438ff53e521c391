"""Label efficiency: how many annotated patches each selection strategy needs, against random picks.

For each data set (benchmarks/al_data.py: the synthetic domain shift and a real annotated fluorescence image)
the demo's base U-Net scores the whole pool through the service's scoring worker (``score_patches``: MC
dropout with one mask seed per round, the acquisition map, the mask-aware patch score, the model's pooled
features); a strategy picks k patches (``bioadapt.active.select``), the simulated annotator answers them from
the ground truth, and the base model is fine-tuned on them (``Adapter.fine_tune``, cosine learning-rate
schedule) for a fixed number of optimiser steps, the same for every budget; ``plateau`` runs fine-tunings of
increasing length at the largest budget to show whether that number is enough (final loss and test F1 stop
improving). F1 at IoU 0.5 on a separate test image measures the result.

- one-shot: the base model's scores pick all k patches at once;
- multi-round (``--multi-round``): pick 2, tune, re-score the pool with the tuned model, pick up to 4, tune
  (from the base model, on every label so far), re-score, ... up to the largest budget;
- random: a seeded permutation of the pool, so smaller budgets are prefixes of larger ones.

Each seed changes the MC masks, the k-means seeding, the random picks and the fine-tuning's batches and
augmentation; the pool, test image and base model stay fixed. Runs are appended to
``<out>_<dataset>.jsonl`` as they finish (so seeds can run as separate processes), and ``report`` writes the
table, the plot and the verdict from every run found.

    python benchmarks/al_efficiency.py plateau --dataset dsb2018
    python benchmarks/al_efficiency.py run --dataset synthetic --seeds 0,1,2,3,4
    python benchmarks/al_efficiency.py report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from al_data import DATASETS, PATCH, base_model, load_dataset, test_f1  # noqa: E402

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "al_efficiency"
TUNE = {"learning_rate": 3e-3, "batch_size": 4, "val_fraction": 0.0, "lr_schedule": "cosine"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bioadapt.active import DEFAULT_STRATEGY

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "plateau", "report"))
    parser.add_argument("--dataset", choices=DATASETS, default="synthetic")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--budgets", default="2,4,8,16,32", help="labelled patches")
    parser.add_argument("--strategies", default=f"random,bald,typical,{DEFAULT_STRATEGY}",
                        help="one-shot strategies (names of bioadapt.active.STRATEGIES)")
    parser.add_argument("--multi-round", default=DEFAULT_STRATEGY, help="strategies also run round by round")
    parser.add_argument("--first-budgets", type=lambda text: [int(b) for b in text.split(",") if b], default=[],
                        help="budgets to run first (then the others, smallest first)")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps of every fine-tuning (the least, "
                        "with --steps-per-label)")
    parser.add_argument("--steps-per-label", type=int, default=0,
                        help="steps grow with the budget: max(--steps, this x labelled patches); 0: fixed")
    parser.add_argument("--passes", type=int, default=16, help="MC-dropout passes when scoring")
    parser.add_argument("--plateau-steps", default="150,300,600,1200", help="lengths of the plateau's runs")
    parser.add_argument("--learning-rate", type=float, default=TUNE["learning_rate"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--workdir", default=None, help="keeps the base model between runs (default: temporary)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--default", default=None, help="report: the strategy judged against random "
                        "(default: bioadapt.active.DEFAULT_STRATEGY)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "report":
        report(args)
        return
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bioadapt-al-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.command == "plateau":
            plateau(args, workdir)
        else:
            run(args, workdir)


class Bench:
    """One data set, the base model behind the service's scoring worker, and the fine-tuning protocol."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        from bioadapt.service.execution import ModelActor, ModelSpec

        self.args = args
        self.dataset = load_dataset(args.dataset, workdir)
        self.worker = ModelActor(ModelSpec(str(base_model(workdir)), {"device": "cpu"}))
        self.base_state = self.worker.adapter.state_dict()
        self.base_f1 = test_f1(self.worker.adapter, self.dataset)

    def score(self, strategy_name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and features of every pool patch under the adapter's current weights, in pool order."""
        from bioadapt.active import STRATEGIES
        from bioadapt.data import ImageRef
        from bioadapt.service.tasks.score import ScoreRequest, score_patches

        strategy = STRATEGIES[strategy_name]
        request = ScoreRequest(image=ImageRef(str(self.dataset.pool_path)), patch_shape=(PATCH, PATCH),
                               passes=self.args.passes, acquisition=strategy.acquisition, reduce=strategy.reduce,
                               seed=seed, features=True)
        patches = [(i, w.origin) for i, w in enumerate(self.dataset.windows)]
        results = {r["patch_id"]: r for r in self.worker.run(score_patches, request, patches)}
        order = range(len(self.dataset.windows))
        return (np.array([results[i]["score"] for i in order]),
                np.array([results[i]["features"] for i in order]))

    def tune(self, picks: list[int], seed: int, steps: int, progress=None) -> dict:
        """Fine-tune the base model on the picked patches for ``steps`` optimiser steps; returns the result."""
        self.worker.adapter.load_state_dict(self.base_state)
        samples = [self.dataset.patch(i) for i in picks]
        epochs = max(1, round(steps / math.ceil(len(picks) / TUNE["batch_size"])))
        params = dict(TUNE, epochs=epochs, seed=seed, learning_rate=self.args.learning_rate)
        result = self.worker.adapter.fine_tune(samples, params, progress=progress)
        return {"epochs": epochs, "steps": epochs * math.ceil(len(picks) / TUNE["batch_size"]),
                "seconds": result.seconds, "final_loss": result.history[-1]["loss"]}


def steps_for(args: argparse.Namespace, budget: int) -> int:
    """Optimiser steps of a fine-tuning on ``budget`` patches: fixed, or growing with the budget so that larger
    budgets are not under-trained (every patch is seen about as often)."""
    return max(args.steps, args.steps_per_label * budget)


def run(args: argparse.Namespace, workdir: Path) -> None:
    from bioadapt.active import STRATEGIES, select

    bench = Bench(args, workdir)
    budgets = sorted(int(b) for b in args.budgets.split(","))
    one_shot = [s for s in args.strategies.split(",") if s]
    rounds = [s for s in args.multi_round.split(",") if s]
    out = Path(f"{args.out}_{args.dataset}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{args.dataset}: base F1 {bench.base_f1:.3f}; pool of {len(bench.dataset.windows)} patches; "
          "steps per fine-tuning: " + ", ".join(f"k={b}: {steps_for(args, b)}" for b in budgets), flush=True)

    def record(seed: int, strategy: str, mode: str, budget: int, picks: list[int], tuned: dict) -> None:
        f1 = test_f1(bench.worker.adapter, bench.dataset)
        if (seed, strategy, mode, budget) in done:  # a multi-round run passes its earlier rounds again
            print(f"seed {seed} {strategy:<20} {mode:<11} k={budget:>2} F1 {f1:.3f} (on record already)", flush=True)
            return
        row = {"dataset": args.dataset, "seed": seed, "strategy": strategy, "mode": mode, "budget": budget,
               "f1": f1, "base_f1": bench.base_f1, "picks": picks, "passes": args.passes,
               "pool": len(bench.dataset.windows), **tuned, "date": time.strftime("%Y-%m-%d %H:%M")}
        with out.open("a") as stream:
            stream.write(json.dumps(row) + "\n")
        print(f"seed {seed} {strategy:<20} {mode:<11} k={budget:>2} F1 {f1:.3f} ({tuned['seconds']:.0f} s)",
              flush=True)

    done = {(r["seed"], r["strategy"], r["mode"], r["budget"]) for r in
            (json.loads(line) for line in (out.read_text().splitlines() if out.exists() else []) if line.strip())}
    for seed in [int(s) for s in args.seeds.split(",")]:
        bench.worker.adapter.load_state_dict(bench.base_state)
        base_scores = {}
        for strategy in dict.fromkeys(one_shot + rounds):
            key = (STRATEGIES[strategy].acquisition, STRATEGIES[strategy].reduce)
            if key not in base_scores and strategy != "random":  # random picks read no score
                base_scores[key] = bench.score(strategy, seed)
        if "random" in one_shot:
            base_scores[("random", "mean")] = (np.zeros(len(bench.dataset.windows)), None)
        first_round = {}  # the first budget's one-shot picks are the multi-round's first round
        # budget by budget, every strategy at each (a run cut short still compares them); runs already in the
        # results file are not repeated
        for budget in sorted(budgets, key=lambda b: (b not in args.first_budgets, b)):
            for strategy in one_shot:
                if (seed, strategy, "one-shot", budget) in done and strategy not in rounds:
                    continue
                scores, features = base_scores[(STRATEGIES[strategy].acquisition, STRATEGIES[strategy].reduce)]
                picks = select(STRATEGIES[strategy].selection, budget, scores, features, seed=1000 + seed)
                tuned = bench.tune(picks, seed, steps_for(args, budget))
                record(seed, strategy, "one-shot", budget, picks, tuned)
                if budget == budgets[0]:
                    first_round[strategy] = (picks, tuned, bench.worker.adapter.state_dict())
        for strategy in rounds:
            labelled: list[int] = []
            for budget in budgets:
                if not labelled and strategy in first_round:
                    labelled, tuned, state = first_round[strategy]
                    bench.worker.adapter.load_state_dict(state)
                    record(seed, strategy, "multi-round", budget, list(labelled), tuned)
                    continue
                if labelled:
                    bench.worker.adapter.load_state_dict(state)
                    scores, features = bench.score(strategy, seed)
                else:
                    scores, features = base_scores[(STRATEGIES[strategy].acquisition, STRATEGIES[strategy].reduce)]
                labelled = labelled + select(STRATEGIES[strategy].selection, budget - len(labelled), scores,
                                             features, labelled=labelled, seed=1000 + seed)
                tuned = bench.tune(labelled, seed, steps_for(args, budget))
                state = bench.worker.adapter.state_dict()
                record(seed, strategy, "multi-round", budget, list(labelled), tuned)


def plateau(args: argparse.Namespace, workdir: Path) -> None:
    """Final training loss and test F1 of fine-tunings of increasing length on the largest budget (random picks,
    3 seeds). Under the cosine schedule a run's middle is not a shorter run, so each length is its own run."""
    bench = Bench(args, workdir)
    budget = max(int(b) for b in args.budgets.split(","))
    lengths = sorted(int(n) for n in args.plateau_steps.split(","))
    rows = []
    for seed in (0, 1, 2):
        picks = [int(i) for i in np.random.default_rng(1000 + seed).permutation(len(bench.dataset.windows))[:budget]]
        for steps in lengths:
            tuned = bench.tune(picks, seed, steps)
            rows.append({"seed": seed, "f1": test_f1(bench.worker.adapter, bench.dataset), **tuned})
            print(f"seed {seed} {tuned['steps']:>5} steps: loss {tuned['final_loss']:.4f} F1 {rows[-1]['f1']:.3f} "
                  f"({tuned['seconds']:.0f} s)", flush=True)
    summary = [{"steps": n, **{f"{key}_{stat}": float(fn([r[key] for r in rows if r["steps"] == n]))
                               for key in ("f1", "final_loss") for stat, fn in (("mean", np.mean), ("std", np.std))}}
               for n in sorted({r["steps"] for r in rows})]
    result = {"dataset": args.dataset, "budget": budget, "runs": rows, "summary": summary, "base_f1": bench.base_f1,
              "benchmark_steps": args.steps, "learning_rate": args.learning_rate, "schedule": TUNE["lr_schedule"],
              "command": "python benchmarks/al_efficiency.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(f"{args.out}_plateau_{args.dataset}_k{budget}_lr{args.learning_rate:g}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")


# -- report ------------------------------------------------------------------------------------------------------
def load_runs(out: str) -> list[dict]:
    runs = []
    for name in DATASETS:
        path = Path(f"{out}_{name}.jsonl")
        if path.exists():
            runs += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return runs


def curves(runs: list[dict]) -> dict:
    """{dataset: {"strategy (mode)": [{budget, mean, std, n}]}}; random's one-shot picks are nested, so random is
    one curve."""
    table: dict = {}
    for row in runs:
        label = "random" if row["strategy"] == "random" else f"{row['strategy']} ({row['mode']})"
        table.setdefault(row["dataset"], {}).setdefault(label, {}).setdefault(row["budget"], []).append(row["f1"])
    return {dataset: {label: [{"budget": b, "mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
                              for b, v in sorted(points.items())] for label, points in sorted(labels.items())}
            for dataset, labels in table.items()}


def labels_to_reach(points: list[dict], target: float) -> float | None:
    """The smallest budget at which the mean curve reaches ``target`` (linear between budgets), None if never."""
    for i, point in enumerate(points):
        if point["mean"] >= target:
            if i == 0:
                return float(point["budget"])
            low, high = points[i - 1], point
            fraction = (target - low["mean"]) / (high["mean"] - low["mean"])
            return float(low["budget"] + fraction * (high["budget"] - low["budget"]))
    return None


def verdict(points: list[dict], random: list[dict], reference_budget: int = 16) -> dict:
    """The issue's criteria: labels needed to reach random's mean F1 at ``reference_budget`` (as a fraction of
    it; target <= 0.6), and the worst gap below random at any budget in units of random's std (target >= -1)."""
    by_budget = {p["budget"]: p for p in random}
    target = by_budget[reference_budget]["mean"]
    needed = labels_to_reach(points, target)
    gaps = [(p["mean"] - by_budget[p["budget"]]["mean"]) / max(by_budget[p["budget"]]["std"], 1e-9)
            for p in points if p["budget"] in by_budget]
    fraction = None if needed is None else needed / reference_budget
    return {"random_f1_at_16": target, "labels_needed": needed, "fraction_of_16": fraction,
            "worst_gap_in_random_std": min(gaps), "meets_label_target": fraction is not None and fraction <= 0.6,
            "never_below_random_by_1_std": min(gaps) >= -1}


def report(args: argparse.Namespace) -> None:
    from bioadapt.active import DEFAULT_STRATEGY

    runs = load_runs(args.out)
    default = args.default or DEFAULT_STRATEGY
    summary = {"curves": curves(runs), "default_strategy": default, "verdicts": {}}
    lines = []
    for dataset, labels in summary["curves"].items():
        rows = [r for r in runs if r["dataset"] == dataset]
        budgets = sorted({r["budget"] for r in rows})
        seeds = sorted({r["seed"] for r in rows})
        steps = sorted({r["steps"] for r in rows if r["budget"] == budgets[-1]})
        lines += [f"## {dataset}: F1 at IoU 0.5 on the test image (mean ± std over seeds {seeds})", "",
                  f"Base model {rows[0]['base_f1']:.3f}; pool of {rows[0]['pool']} patches of {PATCH} x {PATCH}; "
                  f"{rows[0]['passes']} MC passes; {steps} optimiser steps per fine-tuning.", "",
                  "| strategy | " + " | ".join(f"k={b}" for b in budgets) + " |",
                  "| --- |" + " --- |" * len(budgets)]
        for label, points in labels.items():
            cells = {p["budget"]: f"{p['mean']:.3f} ± {p['std']:.3f}" + ("" if p["n"] == len(seeds) else
                                                                        f" (n={p['n']})") for p in points}
            lines.append(f"| {label} | " + " | ".join(cells.get(b, "") for b in budgets) + " |")
        verdicts = {}
        if "random" in labels and 16 in {p["budget"] for p in labels["random"]}:
            for label, points in labels.items():
                if label != "random":
                    verdicts[label] = verdict(points, labels["random"])
        summary["verdicts"][dataset] = verdicts
        if verdicts:
            lines += ["", "Labels needed to reach random's mean F1 at 16 labels (target <= 60 %), and the worst gap "
                      "below random at any budget in random's standard deviations (target >= -1):", "",
                      "| strategy | labels needed | fraction of 16 | worst gap (std) | both targets |",
                      "| --- | --- | --- | --- | --- |"]
            for label, v in verdicts.items():
                needed = "not reached" if v["labels_needed"] is None else f"{v['labels_needed']:.1f}"
                fraction = "-" if v["fraction_of_16"] is None else f"{100 * v['fraction_of_16']:.0f} %"
                met = v["meets_label_target"] and v["never_below_random_by_1_std"]
                mark = " **(default)**" if label.startswith(default + " ") else ""
                lines.append(f"| {label}{mark} | {needed} | {fraction} | {v['worst_gap_in_random_std']:+.2f} | "
                             f"{'yes' if met else 'no'} |")
        lines.append("")
    text = "\n".join(lines)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    out.with_name(out.name + "_table.md").write_text(text)
    plot(summary, out.with_suffix(".png"))
    plot_plateaus(sorted(out.parent.glob(out.name + "_plateau_*.json")), out.with_name(out.name + "_plateau.png"))
    print(text)


def plot_plateaus(paths: list[Path], out: Path) -> None:
    """Final training loss and test F1 against the length of the fine-tuning, on the largest budget."""
    if not paths:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, f1_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for path in paths:
        run = json.loads(path.read_text())
        label = f"{run['dataset']}, k={run['budget']}, lr {run['learning_rate']:g}"
        steps = [r["steps"] for r in run["summary"]]
        for axis, key in ((loss_axis, "final_loss"), (f1_axis, "f1")):
            axis.errorbar(steps, [r[f"{key}_mean"] for r in run["summary"]],
                          yerr=[r[f"{key}_std"] for r in run["summary"]], marker="o", capsize=3, label=label)
    for axis, name in ((loss_axis, "final training loss (last epoch)"), (f1_axis, "F1 at IoU 0.5 (test image)")):
        axis.axvline(run["benchmark_steps"], color="grey", linestyle="--")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("optimiser steps of the fine-tuning (cosine schedule)")
        axis.set_ylabel(name)
        axis.legend(fontsize=7)
    figure.suptitle("largest budget, random picks, mean ± std over 3 seeds; dashed: the benchmark's steps")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(summary["curves"])
    figure, axes = plt.subplots(1, len(datasets), figsize=(6.2 * len(datasets), 4.4), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        for label, points in summary["curves"][dataset].items():
            budgets = [p["budget"] for p in points]
            mean = np.array([p["mean"] for p in points])
            std = np.array([p["std"] for p in points])
            style = "--" if "multi-round" in label else "-"
            width = 2.4 if label.startswith(summary["default_strategy"] + " ") or label == "random" else 1.2
            line, = axis.plot(budgets, mean, style, marker="o", linewidth=width, label=label)
            axis.fill_between(budgets, mean - std, mean + std, alpha=0.12, color=line.get_color())
        axis.set_xscale("log", base=2)
        budgets = sorted({p["budget"] for points in summary["curves"][dataset].values() for p in points})
        axis.set_xticks(budgets)
        axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_xlabel("labelled patches")
        axis.set_ylabel("F1 at IoU 0.5 (test image)")
        axis.set_title(f"{dataset} (band: ± 1 std over seeds)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
