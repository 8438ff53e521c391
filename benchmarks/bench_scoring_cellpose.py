"""Cellpose 3 part of bench_scoring.py: MC scoring of 256 x 256 patches with a random-weight CPnet (cyto3's
architecture, 6.6 M parameters), at T = 3 and T = 16, four ways in one run:

seed_plugin: the napari-activelearning way, one patch at a time and one pass per call of Cellpose's tiled
    network runner (``cellpose.core.run_net``), dropout hooks on;
full: ``CellposeAdapter.mc_proba`` with mc_scope="full" (passes stacked, chunked by the memory budget);
head: mc_scope="head" (features once, T passes of the 1x1 readout only);
bare: the bare forward passes of the network on a pre-made (T, 2, 256, 256) tensor (the compute bound).
Peak memory of the full way at the largest T is measured in a fresh process (VmHWM).
Targets (issue 9): full within 1.25x of bare (>= 2.5x seed_plugin), head >= 40x seed_plugin, < 3 GiB at T = 16.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from timing import interleaved_rates

RESULTS = Path(__file__).parent / "results" / "scoring_cellpose.json"


def _build(tmp: str, device: str, **options):
    from cellpose import resnet_torch

    from bioadapt.adapters import load_adapter

    path = Path(tmp) / "cpnet_random"
    if not path.exists():
        torch.manual_seed(0)
        resnet_torch.CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False).save_model(str(path))
    return load_adapter(f"cellpose:{path}", device=device, **options)


def _patches(n: int) -> np.ndarray:
    from bioadapt.data.synthetic import synthetic_cells

    cells = synthetic_cells((256, 256 * n), "cytoplasm", seed=0).image.astype(np.float32)
    return np.stack([cells[:, :, i * 256:(i + 1) * 256] for i in range(n)])


def _peak_memory(tmp: str, device: str, passes: int, queue) -> None:
    model = _build(tmp, device)
    model.mc_proba(_patches(1), passes=passes)
    queue.put(peak_rss_bytes())


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec,
    so a spawned child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cellpose_main(args: argparse.Namespace) -> None:
    from cellpose import core

    from bioadapt.adapters.dropout import MCDropout

    n = args.cellpose_patches
    passes_list = sorted({3, args.passes})
    with tempfile.TemporaryDirectory() as tmp:
        full = _build(tmp, args.device)
        head = _build(tmp, args.device, mc_scope="head")
        patches = _patches(n)
        net = full.net
        results: dict[str, dict[str, float]] = {}
        for T in passes_list:
            normalised = [full._preprocess(p[None])[0].permute(1, 2, 0).cpu().numpy() for p in patches]
            bare_input = torch.randn(T, 2, 256, 256, device=full.device)

            def seed_plugin() -> None:
                with MCDropout(net, full.dropout_p).enabled():
                    for image in normalised:
                        for _ in range(T):
                            core.run_net(net, image[None], batch_size=8, bsize=224)

            def full_way() -> None:
                for p in patches:
                    full.mc_proba(p[None], passes=T)

            def head_way() -> None:
                for p in patches:
                    head.mc_proba(p[None], passes=T)

            def bare() -> None:
                with torch.no_grad():
                    for _ in range(n):
                        net(bare_input)

            ways = {"seed_plugin": seed_plugin, "full": full_way, "head": head_way, "bare": bare}
            for run in ways.values():
                run()  # warm-up
            rates = interleaved_rates(ways, n, args.rounds)
            results[f"T={T}"] = {k: round(v, 4) for k, v in rates.items()}
            r = rates
            print(f"Cellpose 3, T={T}: " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()) + " patches/s;  "
                  f"full/seed {r['full'] / r['seed_plugin']:.2f}x, bare/full {r['bare'] / r['full']:.2f}, "
                  f"head/seed {r['head'] / r['seed_plugin']:.1f}x")
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(target=_peak_memory, args=(tmp, args.device, max(passes_list), queue))
        child.start()
        peak = queue.get(timeout=600)
        child.join()
    top = results[f"T={max(passes_list)}"]
    summary = {
        "patches_per_second": results,
        "full_over_seed_plugin": round(top["full"] / top["seed_plugin"], 2),
        "bare_over_full": round(top["bare"] / top["full"], 3),
        "head_over_seed_plugin": round(top["head"] / top["seed_plugin"], 1),
        "peak_rss_gib_full_T_max": round(peak / 2**30, 2),
        "targets": "bare/full <= 1.25, head/seed >= 40, peak < 3 GiB at T=16",
        "met": {"full_vs_bare": top["bare"] / top["full"] <= 1.25,
                "head_vs_seed": top["head"] / top["seed_plugin"] >= 40, "memory": peak < 3 * 2**30},
        "patches": n, "rounds": args.rounds, "device": str(full.device), "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "memory_budget_bytes": full.memory_budget,
        "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
    }
    print(json.dumps({k: summary[k] for k in ("full_over_seed_plugin", "bare_over_full", "head_over_seed_plugin",
                                              "peak_rss_gib_full_T_max", "met")}))
    name = RESULTS if full.device.type == "cpu" else RESULTS.with_name(f"scoring_cellpose_{full.device.type}.json")
    name.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written to {name}")
