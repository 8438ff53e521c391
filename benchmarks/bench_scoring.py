"""MC-dropout scoring speed: patches per second with T passes on 256 x 256 patches, three ways in one run.

(a) one patch and one pass per call, as the napari-activelearning plugin scores (the whole predict path,
    pre- and post-processing included, T times per patch);
(b) ``mc_proba``: the T passes of a patch stacked into as few forward calls as the memory budget allows
    (also with 4 patches per call, and with mc_scope="head");
(c) the bare forward passes of the torch module on a pre-made (T, C, 256, 256) tensor, no dropout,
    no pre/post-processing: the compute bound.
Adapters raise glibc's malloc thresholds on CPU (bioadapt/adapters/allocator.py); BIOADAPT_TUNE_MALLOC=0
runs the benchmark without that. The model is a U-Net (features 16, depth 3) without dropout layers, so MC dropout runs through hooks.
Every way runs several rounds, interleaved; the best round counts. Target (issue 3): b within 1.25x of c
(c / b >= 0.8) and b ahead of a.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bioadapt.adapters import load_adapter
from bioadapt.adapters.allocator import tune_malloc
from bioadapt.adapters.unet import UNet
from bioadapt.data.synthetic import synthetic_cells
from bioadapt.exporters.fresh import package_new_model
from timing import interleaved_rates

RESULTS = Path(__file__).parent / "results" / "scoring.json"
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=("unet", "cellpose", "both"), default="both")
    parser.add_argument("--patches", type=int, default=8)
    parser.add_argument("--cellpose-patches", type=int, default=2)
    parser.add_argument("--passes", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--features", type=int, default=16)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if args.model in ("unet", "both"):
        unet_main(args)
    if args.model in ("cellpose", "both"):
        from bench_scoring_cellpose import cellpose_main

        cellpose_main(args)


def unet_main(args: argparse.Namespace) -> None:
    T, n, size = args.passes, args.patches, 256

    kwargs = dict(in_channels=1, out_channels=2, dims=2, features=args.features, depth=3)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        package = package_new_model(UNet(**kwargs).eval(), Path(tmp) / "unet.zip", name="benchmark U-Net",
                                    architecture_kwargs=kwargs, weights=("pytorch_state_dict",))
        model = load_adapter(package, device=args.device)
        head = load_adapter(package, device=args.device, mc_scope="head")
    device = model.device
    cells = synthetic_cells((size * 4, size * 4), "crowded", seed=0).image.astype(np.float32)
    patches = np.stack([cells[:, (i // 4) * size:(i // 4 + 1) * size, (i % 4) * size:(i % 4 + 1) * size]
                        for i in range(n)])
    bare_input = torch.randn(T, 1, size, size, device=device)

    def one_pass_at_a_time() -> None:
        for patch in patches:
            for t in range(T):
                model.mc_proba(patch[None], passes=1, seed=t)

    def batched() -> None:
        for patch in patches:
            model.mc_proba(patch[None], passes=T)

    def batched_4() -> None:
        for i in range(0, n, 4):
            model.mc_proba(patches[i:i + 4], passes=T)

    def head_scope() -> None:
        for patch in patches:
            head.mc_proba(patch[None], passes=T)

    def bare() -> None:
        with torch.no_grad():
            for _ in range(n):
                model.module(bare_input)
            if device.type == "cuda":
                torch.cuda.synchronize()

    ways = {"a_one_pass_at_a_time": one_pass_at_a_time, "b_mc_proba": batched, "b_mc_proba_4_patches": batched_4,
            "b_mc_proba_head": head_scope, "c_bare_forward": bare}
    for run in ways.values():  # warm-up: allocator, thread pools, memory-budget probe
        run() if run is not one_pass_at_a_time else model.mc_proba(patches[:1], passes=1)
    rates = interleaved_rates(ways, n, args.rounds)
    b, a, c = rates["b_mc_proba"], rates["a_one_pass_at_a_time"], rates["c_bare_forward"]
    result = {
        "patches_per_second": {k: round(v, 3) for k, v in rates.items()},
        "b_over_a": round(b / a, 2),
        "c_over_b": round(c / b, 3),
        "overhead_of_b_vs_c_percent": round(100 * (c / b - 1), 1),
        "target": "c/b <= 1.25 and b/a > 1",
        "met": bool(c / b <= 1.25 and b > a),
        "passes": T, "patch": [size, size], "patches": n, "rounds": args.rounds,
        "model": {"architecture": "UNet", **kwargs, "parameters": sum(p.numel() for p in model.module.parameters()),
                  "mc_dropout": model.describe().mc_dropout, "dropout_p": model.dropout_p},
        "device": str(device), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "malloc_env": {v: os.environ.get(v) for v in MALLOC_VARS},
        "malloc_tuned_by_bioadapt": tune_malloc(),
        "machine": platform.platform(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    for name, rate in rates.items():
        print(f"{name:24s} {rate:8.3f} patches/s")
    print(f"b/a = {result['b_over_a']}  c/b = {result['c_over_b']}  (target c/b <= 1.25, b/a > 1): "
          f"{'met' if result['met'] else 'NOT met'}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    suffix = "" if result["malloc_tuned_by_bioadapt"] or device.type != "cpu" else "_untuned_malloc"
    out = RESULTS.with_name(f"scoring{'_' + device.type if device.type != 'cpu' else ''}{suffix}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
