"""Do the patch scores point at the base model's errors? For each pool of the label-efficiency benchmark
(benchmarks/al_data.py), the base model scores every patch through the service's scoring worker (T = 16, round
seed 0) with mean BALD (``bald``) and BALD per object (``object_bald``: the default strategy's first-round score),
and segments it; against the ground truth each patch gets its F1 at IoU 0.5, its number of true and predicted
objects and its foreground fraction. Printed and written: the Spearman correlation of each score with each of
these, and their medians over the 8 top-scored patches against the pool's. A score that finds errors correlates
negatively with the patch F1.

    python benchmarks/bench_score_errors.py
Writes benchmarks/results/score_errors.json and score_errors.md.

With ``--maps``: do the readable maps (bioadapt.active.maps) point at the errors? For each model (the demo base and
the real pre-trained unet2d_nuclei_broad, as in bench_partial_mc.py) and pool, every 64 x 64 window on a
``--stride`` grid is scored with the model's default MC scope (T = 16, round seed 0), segmented, and each pass
segmented too; the base model's errors are the pixels of its objects without a ground-truth partner at IoU 0.5
and of the true objects it misses. Per map: the share of each window's top-decile pixels that are errors, over
the pool's share of error pixels (what a random decile gets): the ratio; and the same over predicted objects
(an object's value: the map's mean over it; top decile of the pool's objects). Writes error_maps.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from al_data import DATASETS  # noqa: E402
from al_efficiency import Bench, parse_args  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SCORES = ("bald", "object_bald")
TOP = 8


def patch_table(bench: Bench) -> dict[str, np.ndarray]:
    """Per pool patch: the base model's F1 (NaN where neither truth nor prediction holds an object), true and
    predicted object counts, foreground fraction."""
    from bioadapt.active import f1_score

    rows = []
    for index in range(len(bench.dataset.windows)):
        pixels, truth = bench.dataset.patch(index)
        labels = bench.worker.adapter.segment(pixels[None])[0]
        true_n, predicted_n = len(np.unique(truth)) - 1, len(np.unique(labels)) - 1
        f1 = f1_score(labels, truth, 0.5) if true_n or predicted_n else np.nan
        rows.append((f1, true_n, predicted_n))
    f1, true_n, predicted_n = (np.array(column, dtype=np.float64) for column in zip(*rows))
    return {"patch_f1": f1, "true_objects": true_n, "predicted_objects": predicted_n,
            "foreground": bench.dataset.foreground_fraction()}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    keep = np.isfinite(a) & np.isfinite(b)
    return float(spearmanr(a[keep], b[keep])[0])


def measure(dataset: str, workdir: Path) -> dict:
    bench = Bench(parse_args(["run", "--dataset", dataset]), workdir)
    table = patch_table(bench)
    result = {"dataset": dataset, "pool": len(bench.dataset.windows), "base_f1": bench.base_f1,
              "pool_median": {key: float(np.nanmedian(values)) for key, values in table.items()}, "scores": {}}
    for strategy in SCORES:
        scores, _ = bench.score(strategy, seed=0)
        top = np.argsort(-scores)[:TOP]
        result["scores"][strategy] = {
            "spearman": {key: spearman(scores, values) for key, values in table.items()},
            f"top{TOP}_median": {key: float(np.nanmedian(values[top])) for key, values in table.items()}}
    return result


def markdown(results: list[dict]) -> str:
    keys = ("patch_f1", "true_objects", "predicted_objects", "foreground")
    lines = ["# Do the patch scores point at the base model's errors?", "",
             "Spearman correlation of each score with the base model's per-patch F1 (IoU 0.5), true and predicted "
             "object counts and foreground fraction over the pool; then medians over the "
             f"{TOP} top-scored patches against the pool's. `python benchmarks/bench_score_errors.py`.", "",
             "| data set | score | rho F1 | rho true objects | rho predicted objects | rho foreground | "
             f"top-{TOP} median F1 / true / predicted objects | pool median F1 / true / predicted |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        pool = result["pool_median"]
        for name, score in result["scores"].items():
            top = score[f"top{TOP}_median"]
            lines.append(f"| {result['dataset']} (base F1 {result['base_f1']:.3f}) | {name} | "
                         + " | ".join(f"{score['spearman'][k]:+.2f}" for k in keys)
                         + f" | {top['patch_f1']:.2f} / {top['true_objects']:.0f} / {top['predicted_objects']:.0f}"
                         + f" | {pool['patch_f1']:.2f} / {pool['true_objects']:.0f} / "
                         + f"{pool['predicted_objects']:.0f} |")
    return "\n".join(lines) + "\n"


def error_pixels(labels: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pixels of predicted objects without a true partner at IoU 0.5 or of missed true objects, per predicted
    object id whether it is such an error)."""
    from bioadapt.active.metrics import best_iou

    wrong = best_iou(labels, truth) < 0.5
    missed = best_iou(truth, labels) < 0.5
    wrong[0] = missed[0] = False
    return wrong[labels] | missed[truth], wrong


def top_decile(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of the top tenth of ``values`` (ties broken at random, so a flat map scores as a random decile)."""
    order = np.lexsort((rng.random(values.size), -values.ravel()))
    return order[:max(1, int(np.ceil(values.size / 10)))]


def map_errors(model: str, source: Path, dataset, indices: list[int], passes: int) -> dict:
    from bioadapt.active import bald
    from bioadapt.active.maps import MAPS, readable_map
    from bioadapt.adapters import load_adapter

    adapter = load_adapter(source, device="cpu")
    activation = adapter.describe().activation
    rng = np.random.default_rng(0)
    hits = {name: 0 for name in MAPS}
    top_pixels, errors, pixels = 0, 0, 0
    objects: dict[str, list[float]] = {name: [] for name in MAPS}
    object_wrong: list[bool] = []
    for index in indices:
        image, truth = dataset.patch(index)
        labels = adapter.segment(image[None])[0]
        samples = adapter.mc_proba(image[None], passes=passes, seed=0)
        pass_labels = adapter.segment_samples(samples)[:, 0]
        score_map = bald(samples[:, 0], activation=activation)
        wrong_pixels, wrong_objects = error_pixels(labels, truth)
        errors, pixels = errors + int(wrong_pixels.sum()), pixels + wrong_pixels.size
        ids = np.unique(labels[labels > 0])
        object_wrong += [bool(wrong_objects[i]) for i in ids]
        for name in MAPS:
            shown = readable_map(name, score_map, labels, pass_labels)
            top = top_decile(shown, rng)
            hits[name] += int(wrong_pixels.ravel()[top].sum())
            sums = np.bincount(labels.ravel(), weights=shown.ravel(), minlength=int(labels.max()) + 1)
            counts = np.bincount(labels.ravel(), minlength=int(labels.max()) + 1)
            objects[name] += [float(sums[i] / counts[i]) for i in ids]
        top_pixels += len(top)
    base_rate = errors / pixels
    wrong = np.array(object_wrong)
    result = {"model": model, "dataset": dataset.name, "windows": len(indices), "scope": adapter.mc_scope,
              "depth": adapter.mc_depth, "passes": passes, "error_pixel_share": round(base_rate, 4),
              "predicted_objects": int(wrong.size), "wrong_object_share": round(float(wrong.mean()), 4), "maps": {}}
    for name in MAPS:
        top = top_decile(np.array(objects[name]), rng)
        result["maps"][name] = {
            "pixel_ratio": round(hits[name] / top_pixels / base_rate, 2) if base_rate else None,
            "object_ratio": round(float(wrong[top].mean()) / float(wrong.mean()), 2) if wrong.any() else None}
    print(json.dumps(result), flush=True)
    return result


def maps_markdown(results: list[dict], command: str) -> str:
    from bioadapt.active.maps import DEFAULT_MAP, MAPS

    lines = ["# Do the readable maps point at the base model's errors?", "",
             f"`{command}`. Ratio: the share of error pixels (objects without a ground-truth partner at IoU 0.5, "
             "and missed true objects) among each window's top-decile pixels of the map, over the pool's share of "
             "error pixels (a random decile's); object ratio: the same over the pool's top decile of predicted "
             f"objects by the map's mean over them. Target: the default map (`{DEFAULT_MAP}`) >= 2 on both real "
             "pools.", "",
             "| model | pool (windows, scope) | error pixels / wrong objects | "
             + " | ".join(f"{name} px / obj" for name in MAPS) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in MAPS) + " |"]
    for r in results:
        lines.append(f"| {r['model']} | {r['dataset']} ({r['windows']}, {r['scope']}"
                     + (f" d={r['depth']}" if r["scope"] == "partial" else "") + f", T={r['passes']}) | "
                     f"{r['error_pixel_share']:.3f} / {r['wrong_object_share']:.2f} ({r['predicted_objects']}) | "
                     + " | ".join(f"{r['maps'][n]['pixel_ratio']} / {r['maps'][n]['object_ratio']}" for n in MAPS)
                     + " |")
    return "\n".join(lines) + "\n"


def maps_main(args: argparse.Namespace) -> None:
    from al_data import base_model, load_dataset
    from bench_partial_mc import nuclei_broad, windows

    results = []
    with tempfile.TemporaryDirectory(prefix="bioadapt-maps-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for model in args.models.split(","):
            source = base_model(workdir) if model == "demo" else nuclei_broad(workdir)
            for name in args.datasets.split(","):
                dataset = load_dataset(name, workdir)
                results.append(map_errors(model, source, dataset, windows(dataset, args.stride), args.passes)
                               | {"date": time.strftime("%Y-%m-%d %H:%M")})
    command = "python benchmarks/bench_score_errors.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "error_maps.json").write_text(json.dumps({"command": command, "results": results}, indent=2) + "\n")
    (RESULTS / "error_maps.md").write_text(maps_markdown(results, command))
    print(maps_markdown(results, command))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="keeps the base model between runs (default: temporary)")
    parser.add_argument("--maps", action="store_true", help="measure the readable maps instead (see above)")
    parser.add_argument("--models", default="demo,nuclei_broad", help="with --maps")
    parser.add_argument("--stride", type=int, default=32, help="with --maps: window grid (al_data's is 16)")
    parser.add_argument("--passes", type=int, default=16, help="with --maps")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.maps:
        return maps_main(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="bioadapt-errors-") as tmp:
        for dataset in args.datasets.split(","):
            workdir = Path(args.workdir or tmp) / dataset
            workdir.mkdir(parents=True, exist_ok=True)
            results.append(measure(dataset, workdir) | {"date": time.strftime("%Y-%m-%d %H:%M")})
            print(json.dumps(results[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "score_errors.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "score_errors.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
