"""Early stopping of fine-tuning (``FineTuneParams.patience``): what it costs in test F1 and saves in epochs.

The label-efficiency benchmark's base U-Net (al_data.base_model) is fine-tuned on 8 randomly picked pool patches of
each data set (seeded), with the adapter's defaults (20 epochs, learning rate 5e-4, a quarter of the patches held
out for validation, cosine schedule) and with a long run (100 epochs, learning rate 3e-3), each at several
patience values (0: never stop early; None: the default, a quarter of the run and at least 5 epochs). F1 at IoU 0.5 on the data set's separate test image.

    python benchmarks/bench_early_stopping.py [--seeds 0,1,2] [--datasets synthetic,dsb2018,bbbc039]
Writes benchmarks/results/early_stopping.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from al_data import base_model, load_dataset, test_f1  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# patience None: the adapter's default, a quarter of the run and at least 5 epochs
RUNS = {"defaults": ({}, (0, 5, 10, None)), "long": ({"epochs": 100, "learning_rate": 3e-3}, (0, 5, 10, 20, None))}
LABELS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--datasets", default="synthetic,dsb2018,bbbc039")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from bioadapt.adapters import load_adapter

    rows = []
    with tempfile.TemporaryDirectory(prefix="bioadapt-early-stopping-") as folder:
        workdir = Path(folder)
        base = base_model(workdir)
        for name in args.datasets.split(","):
            dataset = load_dataset(name, workdir)
            base_f1 = test_f1(load_adapter(base, device="cpu"), dataset)
            for seed in (int(s) for s in args.seeds.split(",")):
                picks = np.random.default_rng(seed).choice(len(dataset.windows), LABELS, replace=False)
                samples = [dataset.patch(int(i)) for i in picks]
                for run, (params, patiences) in RUNS.items():
                    for patience in patiences:
                        model = load_adapter(base, device="cpu")
                        result = model.fine_tune(samples, {**params, "seed": seed, "patience": patience})
                        row = {"dataset": name, "seed": seed, "run": run, "patience": patience, "base_f1": base_f1,
                               "test_f1": test_f1(model, dataset), "epochs_run": result.epochs_run,
                               "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
                               "seconds": result.seconds}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    summary = {}
    for name in args.datasets.split(","):
        for run, (_, patiences) in RUNS.items():
            never = {r["seed"]: r["test_f1"] for r in rows if (r["dataset"], r["run"], r["patience"]) ==
                     (name, run, 0)}
            for patience in patiences:
                mine = [r for r in rows if (r["dataset"], r["run"], r["patience"]) == (name, run, patience)]
                summary[f"{name}/{run}/patience={patience}"] = {
                    "test_f1": round(float(np.mean([r["test_f1"] for r in mine])), 4),
                    "f1_minus_never": round(float(np.mean([r["test_f1"] - never[r["seed"]] for r in mine])), 4),
                    "epochs_run": float(np.mean([r["epochs_run"] for r in mine])),
                    "seconds": round(float(np.mean([r["seconds"] for r in mine])), 1)}
    for key, value in summary.items():
        print(f"{key:40s} F1 {value['test_f1']:.3f} ({value['f1_minus_never']:+.3f} vs never)  "
              f"epochs {value['epochs_run']:.1f}  {value['seconds']:.1f} s")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "early_stopping.json"
    out.write_text(json.dumps({"labels": LABELS, "runs": {k: v[0] for k, v in RUNS.items()}, "summary": summary,
                               "rows": rows, "cpus": os.cpu_count(), "torch_threads": 1}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
