"""Torch threads per fine-tuning process: time per optimiser step with 1 and with 2 threads.

The model is the demo's base U-Net (features 8, depth 2) on 64 x 64 patches, batch 4, the setting of the
label-efficiency benchmark. Each thread count runs in its own child process (torch's thread pool is
process-wide), several rounds alternating, the median step of each round kept; ``--parallel N`` runs N such
processes at once, as N Ray actors or N benchmark seeds would on the same cores.

    python benchmarks/bench_threads.py                 # 1 vs 2 threads, one process at a time
    python benchmarks/bench_threads.py --parallel 2    # 1 vs 2 threads, two processes at once
Writes benchmarks/results/threads.json (or threads_parallel<N>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def step_times(threads: int, steps: int) -> list[float]:
    """Seconds per optimiser step of the demo U-Net's fine-tuning, in this process, with ``threads``."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from bioadapt.adapters.targets import loss
    from bioadapt.adapters.unet import UNet
    from bioadapt.demo import UNET

    torch.manual_seed(0)
    module = UNet(**UNET)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    x = torch.randn(4, 1, 64, 64)
    target = torch.from_numpy((np.random.default_rng(0).random((4, 2, 64, 64)) > 0.5).astype(np.float32))
    valid = torch.ones(4, 1, 64, 64, dtype=torch.bool)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        value = loss(module(x), target, valid, "sigmoid", True)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return times[5:]  # warm-up


def run_children(threads: int, parallel: int, steps: int) -> list[float]:
    """Median seconds per step of each of ``parallel`` child processes run at once."""
    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); from bench_threads import step_times; "
            f"print(json.dumps(step_times({threads}, {steps})))")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    children = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
                for _ in range(parallel)]
    return [statistics.median(json.loads(child.communicate()[0])) for child in children]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", type=int, default=1, help="child processes running at once")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    medians: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for threads in medians:
            medians[threads] += run_children(threads, args.parallel, args.steps)
    load = os.getloadavg()
    result = {
        "ms_per_step": {str(t): {"median": round(1000 * statistics.median(v), 1),
                                 "min": round(1000 * min(v), 1), "max": round(1000 * max(v), 1)}
                        for t, v in medians.items()},
        "slowdown_2_over_1": round(statistics.median(medians[2]) / statistics.median(medians[1]), 2),
        "parallel_processes": args.parallel, "rounds": args.rounds, "steps": args.steps,
        "cpus": os.cpu_count(), "load_average_after": [round(v, 2) for v in load],
        "model": "demo U-Net (features 8, depth 2), 64 x 64, batch 4", "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "threads.json" if args.parallel == 1 else f"threads_parallel{args.parallel}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
