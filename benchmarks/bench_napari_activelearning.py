"""bioadapt's MC scoring against napari-activelearning 0.1.0's own scoring functions, side by side in one process:
the same CPnet (Cellpose 3, cyto3's architecture, random weights seeded 0: no pre-trained weights offline), the
same 256 x 256 patches (BBBC039 crops, ../shared/data/bbbc039) and the same T.

napari-activelearning: ``compute_acquisition_fun(CellposeTunable, patch, T)``, its scoring function: T calls of
``CellposeTunable.probs`` (Cellpose's tiled ``core.run_net`` on its dropout copy of the network: one Dropout(0.05)
after the first activation of each nn.Sequential) and ``compute_BALD``.
bioadapt: ``CellposeAdapter.mc_proba(patch, T)`` (p = 0.05 after every activation, the adapter's default dropout
kind) and ``bioadapt.active.bald``, for mc_scope full, partial (each ``--depths``) and head.
The ways run in turn, patch set by patch set, ``--rounds`` times; each way's fastest round counts.

napari-activelearning needs zarr < 3, napari and its own pins, which bioadapt's environment cannot hold: run this
file in a separate environment (bioadapt itself from the checkout, on PYTHONPATH):

    python3.11 -m venv .venv-nal
    .venv-nal/bin/pip install napari-activelearning==0.1.0 "cellpose>=3.1,<4" "numpy<2" numba==0.60.0 \\
        torch==2.14.1 bioimageio.core==0.11.0 bioimageio.spec==0.5.12.0 "pydantic<2.14" pyqt5
    QT_QPA_PLATFORM=offscreen PYTHONPATH=. nice -n 10 .venv-nal/bin/python benchmarks/bench_napari_activelearning.py
Writes benchmarks/results/napari_activelearning.json and .md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_cellpose_defaults import bbbc039_fields, crops  # noqa: E402
from timing import interleaved_rates  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TARGET = 10.0  # issue 31: partial MC at T = 16 >= 10x napari-activelearning's scoring


def cpnet(folder: str) -> Path:
    import torch
    from cellpose import resnet_torch

    torch.manual_seed(0)
    path = Path(folder) / "cpnet_random"
    resnet_torch.CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False).save_model(str(path))
    return path


def plugin_scorer(weights: Path):
    """napari-activelearning's Cellpose method on ``weights``, on the CPU."""
    from napari_activelearning._models_impl import CellposeTunable

    tunable = CellposeTunable()
    tunable._pretrained_model, tunable._gpu, tunable._channels = str(weights), False, [0, 0]
    return tunable


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="3,16")
    parser.add_argument("--depths", default="2,4,8")
    parser.add_argument("--patches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch
    from napari_activelearning._acquisition import compute_acquisition_fun

    from bioadapt.active import bald
    from bioadapt.adapters import load_adapter

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    patches = crops(bbbc039_fields()[:args.patches], stride=1024)[:args.patches]  # one crop per field
    with tempfile.TemporaryDirectory() as tmp:
        weights = cpnet(tmp)
        plugin = plugin_scorer(weights)
        depths = [int(d) for d in args.depths.split(",")]
        adapters = {"full": load_adapter(f"cellpose:{weights}", device="cpu", mc_scope="full"),
                    "head": load_adapter(f"cellpose:{weights}", device="cpu", mc_scope="head")}
        adapters |= {f"partial d={d}": load_adapter(f"cellpose:{weights}", device="cpu", mc_scope="partial",
                                                    mc_depth=d) for d in depths}
        rates = {}
        for passes in [int(t) for t in args.passes.split(",")]:
            def plugin_way() -> None:
                for patch in patches:
                    compute_acquisition_fun(plugin, np.moveaxis(patch, 0, -1), passes)

            def bioadapt_way(adapter):
                def run() -> None:
                    for patch in patches:
                        bald(adapter.mc_proba(patch, passes=passes), activation="softmax")
                return run

            ways = {"napari-activelearning": plugin_way} | {f"bioadapt {name}": bioadapt_way(adapter)
                                                           for name, adapter in adapters.items()}
            for run in ways.values():
                run()  # warm-up: models built, partial splits traced, masks drawn
            measured = interleaved_rates(ways, len(patches), args.rounds)
            rates[f"T={passes}"] = {name: round(rate, 4) for name, rate in measured.items()}
            print(f"T={passes}: " + "  ".join(f"{k} {v:.3f}" for k, v in measured.items()) + " patches/s", flush=True)
    top = rates[f"T={max(int(t) for t in args.passes.split(','))}"]
    over = {name: round(rate / top["napari-activelearning"], 2) for name, rate in top.items()}
    result = {"network": "Cellpose 3 CPnet [2, 32, 64, 128, 256], random weights (seed 0)",
              "patches": f"{len(patches)} BBBC039 crops of 256 x 256", "patches_per_second": rates,
              "over_napari_activelearning_at_largest_T": over, "target": f">= {TARGET}x at T = 16 (partial)",
              "versions": {p: importlib.metadata.version(p) for p in ("napari-activelearning", "cellpose", "torch")},
              "rounds": args.rounds, "threads": args.threads, "minutes": round((time.perf_counter() - started) / 60, 1),
              "load_average": [round(v, 2) for v in os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": "python benchmarks/bench_napari_activelearning.py " + " ".join(argv or sys.argv[1:])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "napari_activelearning.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# bioadapt against napari-activelearning 0.1.0 (scoring functions, one process)", "",
             f"`{result['command']}` ({result['date']}, {result['minutes']} min, torch threads {args.threads}, load "
             f"average {result['load_average']}); {result['network']}; {result['patches']}; versions "
             f"{result['versions']}. Patches per second, each way's fastest of {args.rounds} rounds.", "",
             "| way | " + " | ".join(rates) + " | x napari-activelearning at the largest T |",
             "| --- | " + " | ".join("---" for _ in rates) + " | --- |"]
    for name in top:
        lines.append(f"| {name} | " + " | ".join(f"{rates[t][name]:.3f}" for t in rates) + f" | {over[name]:.1f} |")
    (RESULTS / "napari_activelearning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
