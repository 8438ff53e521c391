"""MC scoring speed of Cellpose networks on 256 x 256 patches, for the installed Cellpose generation.

Cellpose 4 (Cellpose-SAM, ``cpsam_main``; run this file directly): a random-weight CPSAM (ViT-L, 305 M
parameters; ``--small`` for the reduced test encoder) through ``CellposeAdapter.mc_proba``, three ways at each T:
full: mc_scope="full", dropout after the 24 GELUs of the encoder MLPs (T network passes);
head: mc_scope="head", the network once to the readout, then T passes of dropout + 1x1 readout + the fixed
    conv_transpose2d upsampling;
bare: T bare forward passes of the network on a pre-made tensor (the compute bound of "full").
Target (issue 16): head >= 10x full at T = 16 on CPU. Writes results/scoring_cpsam.json (CPU) or
scoring_cpsam_<device>.json.

Cellpose 3 (``cellpose_main`` under cellpose<4, also reached through bench_scoring.py --model cellpose): a
random-weight CPnet (cyto3's architecture, 6.6 M parameters), at T = 3 and T = 16, four ways in one run:

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
CPSAM_RESULTS = RESULTS.with_name("scoring_cpsam.json")
SMALL_CPSAM = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1]}  # as tests/model_factory.py


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
    """The benchmark of the installed Cellpose generation (bench_scoring.py's ``--model cellpose``)."""
    from bioadapt.adapters.cellpose import GENERATION

    if GENERATION >= 4:
        cpsam_main(argparse.Namespace(passes=[3, args.passes], patches=args.cellpose_patches, rounds=args.rounds,
                                      device=args.device, small=False, bfloat16=None, ways=("full", "head", "bare")))
    else:
        cpnet_main(args)


def cpsam_weights(folder: str | Path, small: bool = False) -> Path:
    """A random-weight CPSAM (ViT-L, or the reduced test encoder) saved as Cellpose saves its models."""
    from bioadapt.adapters.cpsam import build_cpsam

    path = Path(folder) / ("cpsam_small" if small else "cpsam_vitl")
    if not path.exists():
        torch.manual_seed(0)
        build_cpsam(**(SMALL_CPSAM if small else {})).save_model(str(path))
    return path


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mc_rates(model, patches: np.ndarray, passes: int, rounds: int, bare_module: torch.nn.Module,
             bare_shape: tuple[int, ...], dtype: torch.dtype = torch.float32, per_call: int = 1,
             ways: tuple[str, ...] = ("full", "partial", "head", "bare")) -> dict[str, float]:
    """Patches per second of mc_proba's full, partial (the model's default depth) and head scopes (``per_call`` patches per call; the service scores
    one) and of the bare forward passes (T per patch: one call per ``per_call`` patches on a GPU, one row at a time
    on a CPU, as mc_proba runs there), best of ``rounds``."""
    device = model.device
    groups = [patches[i:i + per_call] for i in range(0, len(patches), per_call)]
    bare_input = torch.randn(passes * per_call, *bare_shape, device=device, dtype=dtype)
    rows = len(bare_input) if device.type == "cuda" else 1  # on CPU bigger batches are no faster

    def full() -> None:
        for group in groups:
            model.mc_proba(group, passes=passes, scope="full")

    def partial() -> None:
        for group in groups:
            model.mc_proba(group, passes=passes, scope="partial")

    def head() -> None:
        for group in groups:
            model.mc_proba(group, passes=passes, scope="head")

    def bare() -> None:
        with torch.no_grad():
            for group in groups:
                for i in range(0, passes * len(group), rows):
                    bare_module(bare_input[i:min(i + rows, passes * len(group))])
        synchronize(device)

    chosen = {name: run for name, run in {"full": full, "partial": partial, "head": head, "bare": bare}.items()
              if name in ways}
    # warm-up: the head and partial splits, the memory-budget probe, the allocator (and on a GPU every way's kernels)
    model.mc_proba(groups[0], passes=1, scope="head")
    if "partial" in chosen:
        model.mc_proba(groups[0], passes=1, scope="partial")
    model.mc_proba(groups[0], passes=2, scope="full")
    if device.type == "cuda":
        for run in chosen.values():
            run()
    return interleaved_rates(chosen, len(patches), rounds)


def cpsam_main(args: argparse.Namespace) -> dict:
    """CPSAM's full and head MC against the bare network, at each T of ``args.passes``."""
    from bioadapt.adapters import load_adapter

    with tempfile.TemporaryDirectory() as tmp:
        model = load_adapter(f"cellpose:{cpsam_weights(tmp, args.small)}", device=args.device,
                             bfloat16=args.bfloat16)
    patches = _patches(args.patches)[:, :1]
    results = {}
    for T in args.passes:
        rates = mc_rates(model, patches, T, args.rounds, model.net, (3, 256, 256), model.dtype, ways=args.ways)
        results[f"T={T}"] = {k: round(v, 4) for k, v in rates.items()}
        print(f"CPSAM {'small' if args.small else 'ViT-L'} {str(model.dtype).removeprefix('torch.')}, T={T}: "
              + "  ".join(f"{k} {v:.4f}" for k, v in rates.items())
              + f" patches/s;  head/full {rates['head'] / rates['full']:.1f}x")
    top = results[f"T={max(args.passes)}"]
    summary = {
        "model": "CPSAM " + ("reduced (2 blocks, 32 wide)" if args.small else "ViT-L (305 M parameters)"),
        "random_weights": True, "dtype": str(model.dtype), "patch": [256, 256],
        "patches_per_second": results,
        "head_over_full": round(top["head"] / top["full"], 2),
        "bare_over_full": round(top["bare"] / top["full"], 3) if "bare" in top else None,
        "target": "head >= 10x full at T=16 (CPU)", "met": top["head"] / top["full"] >= 10,
        "patches": len(patches), "rounds": args.rounds, "device": str(model.device),
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "memory_budget_bytes": model.memory_budget,
        "load_average_at_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
    }
    print(json.dumps({k: summary[k] for k in ("head_over_full", "bare_over_full", "met")}))
    if not args.small:
        name = CPSAM_RESULTS if model.device.type == "cpu" else \
            CPSAM_RESULTS.with_name(f"scoring_cpsam_{model.device.type}.json")
        name.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"written to {name}")
    return summary


def cpnet_main(args: argparse.Namespace) -> None:
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", default="3,16", help="comma-separated T values")
    parser.add_argument("--patches", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--small", action="store_true", help="the reduced test encoder (no results file)")
    parser.add_argument("--bfloat16", action="store_true", default=None)
    parser.add_argument("--ways", default="full,head,bare", help="which of full, partial, head, bare to time")
    arguments = parser.parse_args()
    arguments.ways = tuple(arguments.ways.split(","))
    arguments.passes = [int(t) for t in arguments.passes.split(",")]
    cpsam_main(arguments)
