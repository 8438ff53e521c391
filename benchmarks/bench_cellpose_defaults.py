"""Cellpose-SAM's MC defaults (Cellpose 4): scope, depth and dropout kind, by speed on the real ViT-L and by ranking
agreement on real images.

Speed (``--speed``): a random-weight CPSAM of Cellpose's real size (ViT-L, 24 blocks, 305 M parameters: no
pre-trained weights offline) scores one 256 x 256 BBBC039 crop at T = 16 through ``CellposeAdapter.mc_proba``,
float32 on the CPU: head, and partial at each ``--depths`` (its depth counts the encoder's MLP activations from the
end: depth d keeps the last d blocks' MLP activations stochastic, the readout and neck after them computed per
pass). Full MC is left out: 0.0011 patches/s measured before (results/scoring_cpsam.json), ~15 minutes a patch.
Target (issue 31): the default >= 0.1 patches/s. ``--small``: the same with the tests' reduced encoder.

Ranking (``--ranking``; under Cellpose 3 the same for a random-weight CPnet, cyto3's architecture): a reduced
random-weight CPSAM (``--width`` wide, ``--blocks`` blocks; a random network, so this measures how the MC ways
agree, not what a trained model's uncertainty finds) scores a pool of 256 x 256 windows of the first ``--fields``
BBBC039 fields (../shared/data/bbbc039; 4 per field, every 256 px) with BALD reduced by ``mean``, for each dropout
kind: full MC with round seeds 0 and 1 (seed stability: the kind's noise floor), head, and partial at each depth
(Spearman and top-16 overlap with full MC, seed 0).

    nice -n 10 python benchmarks/bench_cellpose_defaults.py --speed --ranking
Writes benchmarks/results/cellpose_defaults.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from shared_data import SHARED_DATA  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOP = 16


def bbbc039_fields() -> list[np.ndarray]:
    import tifffile

    folder = SHARED_DATA / "bbbc039" / "images"
    if not folder.is_dir():
        raise SystemExit(f"{folder} is missing: set BIOADAPT_SHARED_DATA to the folder that holds bbbc039")
    return [tifffile.imread(path).astype(np.float32) for path in sorted(folder.glob("*.tif"))]


def crops(fields: list[np.ndarray], size: int = 256, stride: int = 128) -> np.ndarray:
    out = [field[y:y + size, x:x + size] for field in fields
           for y in range(0, field.shape[0] - size + 1, stride) for x in range(0, field.shape[1] - size + 1, stride)]
    return np.stack(out)[:, None]


def cpsam(tmp: str, **size) -> str:
    import torch

    from bioadapt.adapters.cpsam import build_cpsam

    torch.manual_seed(0)
    path = Path(tmp) / "cpsam"
    build_cpsam(**size).save_model(str(path))
    return f"cellpose:{path}"


def speed(depths: list[int], passes: int, small: bool) -> dict:
    from bioadapt.adapters import load_adapter
    from model_factory import SMALL_CPSAM

    patch = crops(bbbc039_fields()[:1])[:1]
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        source = cpsam(tmp, **(SMALL_CPSAM if small else {}))
        ways = {"head": {"mc_scope": "head"}} | {f"partial d={d}": {"mc_scope": "partial", "mc_depth": d}
                                                 for d in depths}
        for name, options in ways.items():
            model = load_adapter(source, device="cpu", bfloat16=False, **options)
            model.mc_proba(patch, passes=passes, seed=0)  # traces the network (partial) and measures memory
            started = time.perf_counter()
            model.mc_proba(patch, passes=passes, seed=1)
            rates[name] = round(1 / (time.perf_counter() - started), 4)
            print(f"CPSAM {'small' if small else 'ViT-L'} {name}: {rates[name]} patches/s", flush=True)
            del model
    model = f"CPSAM {'reduced test encoder ' + str(SMALL_CPSAM) if small else 'ViT-L'} (random weights)"
    return {"model": model, "passes": passes, "patch": [256, 256],
            "patches_per_second": rates, "target": ">= 0.1 patches/s"}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return len(set(np.argsort(-a)[:TOP].tolist()) & set(np.argsort(-b)[:TOP].tolist())) / TOP


def cpnet(tmp: str) -> str:
    import torch
    from cellpose import resnet_torch

    torch.manual_seed(0)
    path = Path(tmp) / "cpnet"
    resnet_torch.CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False).save_model(str(path))
    return f"cellpose:{path}"


def ranking(depths: list[int], passes: int, width: int, blocks: int, fields: int) -> dict:
    from bioadapt.active import bald
    from bioadapt.adapters import load_adapter
    from bioadapt.adapters.cellpose import GENERATION

    pool = crops(bbbc039_fields()[:fields], stride=256)
    size = {"embed_dim": width, "depth": blocks, "num_heads": max(1, width // 32),
            "global_attn_indexes": [blocks // 2 - 1, blocks - 1]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = cpsam(tmp, **size) if GENERATION >= 4 else cpnet(tmp)
        for kind in ("element", "channel"):
            ways = {"full": {}, "head": {"mc_scope": "head"}} | {
                f"partial d={d}": {"mc_scope": "partial", "mc_depth": d} for d in depths}
            models = {name: load_adapter(source, device="cpu", dropout_kind=kind, **options)
                      for name, options in ways.items()}
            runs = [("full seed 1", "full", 1)] + [(name, name, 0) for name in ways]
            scores = {name: [] for name, _, _ in runs}
            seconds = {name: 0.0 for name, _, _ in runs}
            for window in pool:
                for name, way, seed in runs:
                    started = time.perf_counter()
                    samples = models[way].mc_proba(window, passes=passes, seed=seed)
                    seconds[name] += time.perf_counter() - started
                    scores[name].append(float(bald(samples, activation="softmax").mean()))
            reference = np.array(scores["full"])
            for name, _, _ in runs:
                if name == "full":
                    continue
                values = np.array(scores[name])
                rows.append({"kind": kind, "way": name, "spearman_with_full": round(spearman(values, reference), 3),
                             f"top{TOP}_with_full": round(overlap(values, reference), 3),
                             "speedup_over_full": round(seconds["full"] / seconds[name], 2)})
                print(json.dumps(rows[-1]), flush=True)
    model = (f"CPSAM reduced ({blocks} blocks, {width} wide, random weights)" if GENERATION >= 4 else
             "Cellpose 3 CPnet [2, 32, 64, 128, 256] (random weights)")
    return {"model": model, "encoder": size if GENERATION >= 4 else None,
            "pool": f"{len(pool)} windows of 256 x 256, every 256 px of {fields} BBBC039 fields", "passes": passes,
            "score": "mean BALD", "rows": rows}


def markdown(result: dict) -> str:
    lines = ["# Cellpose-SAM MC defaults", "", f"`{result['command']}` ({result['date']}, {result['minutes']} min, "
             f"torch threads {result['threads']}, load average {result['load_average']}).", ""]
    for key in ("speed", "speed_small"):
        if key not in result:
            continue
        s = result[key]
        lines += [f"## Speed: {s['model']}, one {s['patch'][0]} x {s['patch'][1]} BBBC039 crop, T = {s['passes']}, "
                  f"float32, CPU (target {s['target']})", "", "| way | patches/s |", "| --- | --- |"]
        lines += [f"| {name} | {rate} |" for name, rate in s["patches_per_second"].items()]
        lines += ["| full (results/scoring_cpsam.json, earlier run) | 0.0011 |", ""] if key == "speed" else [""]
    for key in ("ranking", "ranking_cpnet"):
        if key not in result:
            continue
        r = result[key]
        lines += [f"## Ranking: {r['model']}, {r['pool']}, T = {r['passes']}, {r['score']}", "",
                  "Spearman and top-16 overlap with full MC (round seed 0) of the same dropout kind; `full seed 1`: "
                  "the kind's seed-to-seed stability.", "",
                  "| kind | way | Spearman | top-16 | speed-up |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {row['kind']} | {row['way']} | {row['spearman_with_full']:.3f} "
                  f"| {row[f'top{TOP}_with_full']:.2f} | {row['speedup_over_full']:.1f} |" for row in r["rows"]] + [""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--ranking", action="store_true")
    parser.add_argument("--depths", default="1,2,4")
    parser.add_argument("--passes", type=int, default=16)
    parser.add_argument("--small", action="store_true", help="--speed with the tests' reduced encoder")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--fields", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    depths = [int(d) for d in args.depths.split(",")]
    written = RESULTS / "cellpose_defaults.json"
    result: dict = json.loads(written.read_text()) if written.exists() else {}  # the other part's last run stays
    if args.speed:
        result["speed_small" if args.small else "speed"] = speed(depths, args.passes, args.small)
    if args.ranking:  # Cellpose 4's CPSAM, or CPnet where Cellpose 3 is installed
        from bioadapt.adapters.cellpose import GENERATION

        key = "ranking" if GENERATION >= 4 else "ranking_cpnet"
        result[key] = ranking(depths, args.passes, args.width, args.blocks, args.fields)
    result |= {"command": "python benchmarks/bench_cellpose_defaults.py " + " ".join(argv or sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d %H:%M"), "minutes": round((time.perf_counter() - started) / 60, 1),
               "threads": args.threads, "load_average": [round(v, 2) for v in os.getloadavg()]}
    RESULTS.mkdir(exist_ok=True)
    written.write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "cellpose_defaults.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
