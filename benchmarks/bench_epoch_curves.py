"""Which epoch should a fine-tune keep? Per-epoch held-out scores against the user's test F1, for one fine-tune.

A fine-tune keeps the epoch that scores best on its held-out patches (``FineTuneParams.val_metric``). Whether a
rule picks well shows only next to what each epoch gives on separate test fields, which the service benchmark
(service_al.py) does not record. Here one fine-tune runs without early stopping through the adapter the service
uses, as the service runs it: ``--labels`` random 128 x 128 windows of a whole-field set's pool fields (seeded),
every 4th held out for the service's verdict, the rest to ``fine_tune`` with the adapter's defaults (a quarter of
them held out to choose the epoch; ``--learning-rate`` overrides its rate). Every epoch records the held-out
object F1 (recomputed by ``segment``; the fit's own score agreed in 2,381 of 2,400 epochs) and the
foreground channel's Dice (the fit's ``val_metric="dice"`` also averages the boundary channel: the "dice" rule
here approximates it), and keeps the weights; afterwards each selection rule is
replayed on that history with the default early stopping (a quarter of the run) and the test F1 of the epoch it
keeps is measured, beside the test F1 every ``--test-every`` epochs.

    BIOADAPT_SHARED_DATA=../shared/data python benchmarks/bench_epoch_curves.py run --dataset bbbc039 --base demo \
        --labels 16 --seed 0
    python benchmarks/bench_epoch_curves.py report

Rows are appended to ``benchmarks/results/epoch_curves.jsonl``; ``report`` writes ``epoch_curves.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from al_data import pooled_f1, whole_fields  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ROWS = RESULTS / "epoch_curves.jsonl"
PATCH = 128
RULES = ("f1", "dice", "f1_then_dice", "last")  # "last": no selection, the run's last epoch


def random_windows(pool: list, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` (image (1, P, P) float32, labels (P, P)) windows at seeded random places of random pool fields."""
    rng = np.random.default_rng(seed)
    windows = []
    while len(windows) < count:
        field = pool[rng.integers(len(pool))]
        _, height, width = field.image.shape
        y, x = rng.integers(0, height - PATCH + 1), rng.integers(0, width - PATCH + 1)
        windows.append((field.image[:, y:y + PATCH, x:x + PATCH].astype(np.float32),
                        field.truth[y:y + PATCH, x:x + PATCH]))
    return windows


def foreground_dice(model: Any, samples: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Dice of the first output channel above 0.5 against the labelled objects, pooled over ``samples``."""
    overlap = total = 0
    for image, labels in samples:
        predicted = model.predict_proba(image[None])[0, 0] > 0.5
        overlap += int((predicted & (labels > 0)).sum())
        total += int(predicted.sum() + (labels > 0).sum())
    return 2 * overlap / total if total else 1.0


def replay(history: list[dict[str, Any]], rule: str, patience: int) -> int:
    """The epoch a selection rule keeps over ``history`` (epoch 0 first), ending after ``patience`` epochs without
    a better score as fit does."""
    def key(row: dict[str, Any]) -> tuple[float, ...]:
        return {"f1": (row["val_f1"],), "dice": (row["val_dice"],),
                "f1_then_dice": (row["val_f1"], row["val_dice"])}[rule]

    if rule == "last":
        return history[-1]["epoch"]
    best = history[0]
    for row in history[1:]:
        if key(row) > key(best):
            best = row
        if patience and row["epoch"] - best["epoch"] >= patience:
            break
    return best["epoch"]


def run(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    from service_al import base_package

    from bioadapt.adapters import FineTuneParams, load_adapter
    from bioadapt.adapters.training import split_indices

    pool, test = whole_fields(args.dataset)
    windows = random_windows(pool, args.labels, args.seed)
    train = [w for i, w in enumerate(windows) if i % 4 != 3]  # the service's verdict holds out every 4th
    params = FineTuneParams(patience=0, **({"learning_rate": args.learning_rate} if args.learning_rate else {}))
    _, held = split_indices(len(train), params.val_fraction, params.seed)
    validation = [train[i] for i in held]
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = load_adapter(base_package(args.base, args.workdir), device="cpu")  # built once per work folder
    states: dict[int, dict[str, Any]] = {}
    history: list[dict[str, Any]] = []

    def record(epoch: int, fit_score: float | None) -> None:
        segmented = [model.segment(image[None])[0] for image, _ in validation]
        val_f1 = pooled_f1(segmented, [labels for _, labels in validation])["f1"]
        history.append({"epoch": epoch, "val_f1": round(float(val_f1), 6), "fit_score": fit_score,
                        "val_dice": round(foreground_dice(model, validation), 6)})
        states[epoch] = copy.deepcopy(model.module.state_dict())
        model.module.eval()

    started = time.perf_counter()
    record(0, None)
    result = model.fine_tune(train, params, progress=lambda info: record(info["epoch"], info["val_score"]))
    picks = {rule: replay(history, rule, FineTuneParams().patience_epochs) for rule in RULES}
    test_at = sorted({0, *range(args.test_every, result.epochs_run + 1, args.test_every), *picks.values(),
                      result.best_epoch})
    test_f1 = {}
    for epoch in test_at:
        model.module.load_state_dict(states[epoch])
        model.module.eval()
        test_f1[epoch] = pooled_f1([model.segment(field.image[None])[0] for field in test],
                                   [field.truth for field in test])
    row = {"dataset": args.dataset, "base": args.base, "labels": args.labels, "seed": args.seed,
           "learning_rate": params.learning_rate, "patience": FineTuneParams().patience_epochs, "n_train": result.n_train, "n_val": result.n_val,
           "fit_best_epoch": result.best_epoch, "picks": picks,
           "pick_test_f1": {rule: test_f1[epoch]["f1"] for rule, epoch in picks.items()},
           "history": history, "test": {str(e): v for e, v in test_f1.items()},
           "seconds": round(time.perf_counter() - started, 1), "date": time.strftime("%Y-%m-%d %H:%M")}
    RESULTS.mkdir(exist_ok=True)
    with ROWS.open("a") as out:
        out.write(json.dumps(row) + "\n")
    print(f"{args.dataset} {args.base} {args.labels} labels seed {args.seed} lr {params.learning_rate}: test F1 "
          f"base {test_f1[0]['f1']:.3f}; " + ", ".join(f"{rule} keeps epoch {picks[rule]} -> {row['pick_test_f1'][rule]:.3f}"
                                                       for rule in RULES), flush=True)


def report() -> None:
    rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    lines = ["# Which epoch a fine-tune keeps, against the user's test F1", "",
             "Written by `benchmarks/bench_epoch_curves.py report` from `epoch_curves.jsonl`. One fine-tune per row "
             "(random 128 x 128 windows, the service's verdict patches left out, no early stopping while it runs); "
             "each rule replayed with the default early stopping; `last`: the run's last epoch, no selection. Test F1 at IoU 0.5 pooled over the set's test "
             "fields; in brackets the epoch kept.", "",
             "| set | base | labels | seed | lr | train / held out | base F1 | " + " | ".join(RULES)
             + " | best test F1 seen (epoch) |", "|" + " --- |" * (8 + len(RULES))]
    for r in rows:  # picks replayed here, so that a rule added later is judged on earlier rows too
        r["picks"] = {rule: replay(r["history"], rule, r.get("patience", 25)) for rule in RULES}
        if any(str(epoch) not in r["test"] for epoch in r["picks"].values()):
            continue
        r["pick_test_f1"] = {rule: r["test"][str(epoch)]["f1"] for rule, epoch in r["picks"].items()}
        best_epoch, best = max(((int(e), v["f1"]) for e, v in r["test"].items()), key=lambda item: item[1])
        lines.append(f"| {r['dataset']} | {r['base']} | {r['labels']} | {r['seed']} | {r['learning_rate']:g} | "
                     f"{r['n_train']} / {r['n_val']} | {r['test']['0']['f1']:.3f} | "
                     + " | ".join(f"{r['pick_test_f1'][rule]:.3f} ({r['picks'][rule]})" for rule in RULES)
                     + f" | {best:.3f} ({best_epoch}) |")
    (RESULTS / "epoch_curves.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run")
    go.add_argument("--dataset", default="bbbc039", choices=("bbbc039", "kromp", "usiigaci"))
    go.add_argument("--base", default="demo", choices=("demo", "demo_deep", "nuclei_broad"))
    go.add_argument("--labels", type=int, default=16)
    go.add_argument("--seed", type=int, default=0)
    go.add_argument("--learning-rate", type=float, default=None)
    go.add_argument("--test-every", type=int, default=10)
    go.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bioadapt-epoch-curves")
    sub.add_parser("report")
    args = parser.parse_args()
    run(args) if args.command == "run" else report()


if __name__ == "__main__":
    main()
