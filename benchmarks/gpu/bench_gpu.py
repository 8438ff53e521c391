"""The GPU check's benchmarks: MC scoring and fine-tuning speed of the networks bioadapt adapts, on CUDA (or, with
``--device cpu --small``, a small setting on the CPU that keeps this script working in CI).

Models: ``unet`` (bioadapt's U-Net, features 16, depth 3, packaged for bioimage.io here), ``cpsam`` (Cellpose 4's
Cellpose-SAM, ViT-L with random weights; ``--small``: the reduced test encoder) in float32 and bfloat16, and
``cpnet`` (Cellpose 3's network, cyto3's architecture; needs cellpose<4: run.sh runs it in a second process).
For each: patches/s of mc_proba with scope "full", "partial" (the adapter's default depth) and "head" and of the
bare forward passes at T = 3 and 16, one
patch per call (as the service scores) and 16 per call; fine-tuning seconds per epoch. Results are merged into
the JSON file ``--out`` under the model's name.

Targets (issue 16, on the GPU): full MC at T = 16 within 1.5x of the bare forward bound; CPSAM head-only at T = 16
>= 100 patches/s of 256 x 256.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/
from bench_scoring_cellpose import cpsam_weights, mc_rates  # noqa: E402

PASSES = (3, 16)
SMALL_PASSES = (2, 4)  # --small: keeps every path running in CI in seconds


def _patches(n: int, size: int = 256, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """n (image (1, size, size), instance labels) pairs of synthetic nuclei."""
    from bioadapt.data.synthetic import synthetic_cells

    cells = synthetic_cells((size, size * n), "nuclei", seed=seed)
    return [(cells.image[:1, :, i * size:(i + 1) * size].astype(np.float32), cells.labels[:, i * size:(i + 1) * size])
            for i in range(n)]


def _seconds_per_epoch(history: list[dict]) -> list[float]:
    times = [h["seconds"] for h in history]
    return [round(b - a, 3) for a, b in zip([0.0] + times[:-1], times)]


def _scoring(model, images: np.ndarray, module: torch.nn.Module, shape: tuple[int, ...], passes: tuple[int, ...],
             rounds: int, per_call: list[int]) -> dict:
    out = {}
    for calls in per_call:
        for T in passes:
            rates = mc_rates(model, images, T, rounds, module, shape, getattr(model, "dtype", torch.float32),
                             per_call=calls)
            out[f"T={T},per_call={calls}"] = {k: round(v, 3) for k, v in rates.items()} | {
                "bare_over_full": round(rates["bare"] / rates["full"], 3),
                "head_over_full": round(rates["head"] / rates["full"], 2),
                "partial_over_full": round(rates["partial"] / rates["full"], 2)}
            print(f"  T={T:2d} per call {calls:2d}: " + "  ".join(f"{k} {v:9.2f}" for k, v in rates.items())
                  + " patches/s", flush=True)
    return out


def unet(device: str, small: bool, rounds: int, per_call: list[int]) -> dict:
    from bioadapt.adapters import load_adapter
    from bioadapt.adapters.unet import UNet
    from bioadapt.exporters.fresh import package_new_model

    kwargs = dict(in_channels=1, out_channels=2, dims=2, features=8 if small else 16, depth=3)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        package = package_new_model(UNet(**kwargs).eval(), Path(tmp) / "unet.zip", name="benchmark U-Net",
                                    architecture_kwargs=kwargs, weights=("pytorch_state_dict",))
        model = load_adapter(package, device=device)
    pairs = _patches(2 if small else 16)
    images = np.stack([p[0] for p in pairs])
    result = {"parameters": sum(p.numel() for p in model.module.parameters()), "dtype": "float32",
              "scoring": _scoring(model, images, model.module, (1, 256, 256),
                                               SMALL_PASSES if small else PASSES, rounds, per_call)}
    tuned = model.fine_tune(pairs, {"epochs": 2, "batch_size": 8, "val_fraction": 0.5 if small else 0.25})
    result["fine_tune"] = {"patches": len(pairs), "batch_size": 8, "seconds_per_epoch": _seconds_per_epoch(tuned.history)}
    return result


def cellpose(name: str, device: str, small: bool, rounds: int, per_call: list[int]) -> dict:
    """``cpsam`` (float32 and bfloat16 scoring; train_seg trains in float32 either way) or ``cpnet``."""
    from bioadapt.adapters import load_adapter
    from bioadapt.adapters.cellpose import GENERATION

    expected = 4 if name == "cpsam" else 3
    if GENERATION != expected:
        raise RuntimeError(f"{name} needs Cellpose {expected}, but Cellpose {GENERATION} is installed here")
    pairs = _patches(2 if small else 16)
    images = np.stack([p[0] for p in pairs])
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if name == "cpsam":
            weights = cpsam_weights(tmp, small)
            precisions = {"float32": False, "bfloat16": True}
        else:
            from cellpose import resnet_torch

            weights = Path(tmp) / "cpnet"
            torch.manual_seed(0)
            resnet_torch.CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False).save_model(str(weights))
            precisions = {"float32": None}
        for precision, bfloat16 in precisions.items():
            model = load_adapter(f"cellpose:{weights}", device=device, bfloat16=bfloat16)
            print(f" {name} {precision}", flush=True)
            channels = 3 if name == "cpsam" else 2
            # bfloat16 on a CPU without bf16 units is ~10x slower: the small setting only checks that it runs
            passes = PASSES if not small else SMALL_PASSES[:1] if bfloat16 else SMALL_PASSES
            result[precision] = _scoring(model, images, model.net, (channels, 256, 256), passes, rounds, per_call)
        result["parameters"] = sum(p.numel() for p in model.net.parameters())
        epochs = 2
        tuned = model.fine_tune(pairs, {"epochs": epochs, "min_train_masks": 1, "val_fraction": 0.5 if small else 0.25})
        result["fine_tune"] = {"patches": len(pairs), "params": "train_seg's defaults (batch 1 for CPSAM, 8 for CPnet)",
                               "seconds_per_epoch": _seconds_per_epoch(tuned.history),
                               "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                               if torch.cuda.is_available() else None}
    return result


def _targets(results: dict) -> dict:
    """The issue's GPU targets, where the figures exist."""
    met = {}
    for model, figures in results.items():
        for precision, scoring in ((p, s) for p, s in figures.items() if p in ("float32", "bfloat16", "scoring")):
            for key in (k for k in scoring if k.startswith("T=16,")):
                met[f"{model} {precision} full within 1.5x of bare ({key})"] = scoring[key]["bare_over_full"] <= 1.5
        heads = [v["head"] for k, v in figures.get("bfloat16", {}).items() if k.startswith("T=16,")]
        if model == "cpsam" and heads:
            met["cpsam bfloat16 head >= 100 patches/s at T=16"] = max(heads) >= 100
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="unet,cpsam", help="comma-separated: unet, cpsam, cpnet")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="the small CPU setting: reduced networks, few patches")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", required=True, help="JSON file; results are merged into it")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    report.setdefault("models", {})
    per_call = [1] if args.small else [1, 16]
    if args.small:
        args.rounds = 1
    for name in args.models.split(","):
        started = time.perf_counter()
        print(f"{name} on {args.device}", flush=True)
        try:
            figures = unet(args.device, args.small, args.rounds, per_call) if name == "unet" else \
                cellpose(name, args.device, args.small, args.rounds, per_call)
        except Exception as e:  # one model's failure must not hide the others' figures
            traceback.print_exc()
            figures = {"error": f"{type(e).__name__}: {e}"}
        figures["seconds"] = round(time.perf_counter() - started, 1)
        report["models"][name] = figures
        report["targets_met"] = _targets({k: v for k, v in report["models"].items() if "error" not in v})
        report["machine"] = {
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "small": args.small,
            "date": time.strftime("%Y-%m-%d %H:%M"), "torch_threads": torch.get_num_threads()}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")  # after each model: a time-out keeps what was measured
    print(json.dumps(report["targets_met"], indent=1))
    failed = [n for n, v in report["models"].items() if "error" in v]
    if failed:
        sys.exit(f"failed: {failed}")


if __name__ == "__main__":
    main()
