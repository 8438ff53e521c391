"""`bioadapt demo`: one full active-learning round through the real service, on data made here.

A base U-Net is trained for a few seconds on one synthetic style ('nuclei') and packaged for bioimage.io; a large
image of another style ('crowded': the domain shift) is written as TIFF and converted to OME-Zarr, its ground
truth kept aside. `bioadapt serve` then runs as a child process (embedded Hypha server on 127.0.0.1, local Ray)
and this script drives it with the Python client, as a user would: create a project, score patches (MC-dropout
BALD and the default strategy's score), take the ones the service picks, answer them from the ground truth (a
simulated annotator), fine-tune, evaluate
(F1 before / after on held-out patches), export a bioimage.io package and test it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from tqdm.auto import tqdm


PIXEL_SIZE_UM = 0.65
BASE_STYLE, TARGET_STYLE = "nuclei", "crowded"
UNET = dict(in_channels=1, out_channels=2, dims=2, features=8, depth=2, batchnorm=False, dropout=0.0)
LEARNING_RATE = 3e-3  # the demo's small U-Net trains for seconds: faster than the adapter's default rate


def build_base_model(out: Path, epochs: int, seed: int, architecture: Mapping[str, Any] | None = None) -> Path:
    """A foreground + boundary U-Net (``architecture``: UNet's arguments, the demo's ``UNET`` by default) trained
    briefly on the base style, as a bioimage.io package."""
    import torch

    from bioadapt.adapters import load_adapter
    from bioadapt.adapters.unet import UNet
    from bioadapt.data.synthetic import synthetic_cells
    from bioadapt.exporters.fresh import package_new_model

    torch.manual_seed(seed)
    names = ("foreground", "boundaries")
    architecture = dict(UNET if architecture is None else architecture)
    fresh = package_new_model(UNet(**architecture).eval(), out.with_name("untrained.zip"), name="untrained U-Net",
                              architecture_kwargs=architecture, output_names=names, weights=("pytorch_state_dict",))
    model = load_adapter(fresh, device="cpu")
    cells = synthetic_cells((512, 512), BASE_STYLE, seed=seed + 1)
    pairs = [(cells.image[:, y:y + 64, x:x + 64].astype(np.float32), cells.labels[y:y + 64, x:x + 64])
             for y in range(0, 512, 64) for x in range(0, 512, 64)][:32]
    with tqdm(total=epochs, desc=f"train base model on '{BASE_STYLE}'", unit="epoch") as bar:
        model.fine_tune(pairs, {"epochs": epochs, "learning_rate": LEARNING_RATE, "batch_size": 8},
                        progress=lambda info: bar.update(info["epoch"] - bar.n))
    return package_new_model(model.module, out, name=f"{BASE_STYLE} U-Net (bioadapt demo base)",
                             description=f"A small U-Net trained for {epochs} epochs on synthetic '{BASE_STYLE}' "
                             "images: the pre-trained model the demo adapts.", architecture_kwargs=architecture,
                             output_names=names, weights=("pytorch_state_dict",))


def write_target_image(workdir: Path, size: int, seed: int) -> tuple[Path, np.ndarray]:
    """The scientist's image (TIFF -> OME-Zarr) and its ground truth, which only the simulated annotator sees."""
    from bioadapt.data.convert import convert_to_ome_zarr
    from bioadapt.data.synthetic import synthetic_cells

    sample = synthetic_cells((size, size), TARGET_STYLE, seed, tissue_fraction=0.6)
    tiff = workdir / "cells.ome.tif"
    tifffile.imwrite(tiff, sample.image, ome=True, tile=(512, 512), compression="zlib",
                     metadata={"axes": "CYX", "PhysicalSizeX": PIXEL_SIZE_UM, "PhysicalSizeY": PIXEL_SIZE_UM})
    zarr_path = convert_to_ome_zarr(tiff, workdir / "cells.ome.zarr")
    return Path(zarr_path), sample.labels


def run_demo(workdir: str | Path = "demo-output", size: int = 2048, n_patches: int | None = None, top_k: int = 16,
             patch_size: int | None = None, epochs: int = 150, base_epochs: int = 40, mc_passes: int | None = None,
             seed: int = 0) -> dict[str, Any]:
    """Run the demo and return its summary (also printed and written to summary.json). ``n_patches``,
    ``patch_size`` and ``mc_passes`` left None are not sent: the service's defaults apply."""
    from bioadapt.service.client import connect
    from bioadapt.service.serve_process import ServeProcess

    started = time.perf_counter()
    workdir = Path(workdir).resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    print(f"1/8 building the base model: a U-Net trained on synthetic '{BASE_STYLE}' images ...")
    base = build_base_model(workdir / "base-model.zip", base_epochs, seed)
    print(f"2/8 writing the scientist's {size} x {size} image of another style ('{TARGET_STYLE}') as TIFF and "
          "converting it to OME-Zarr (ground truth kept aside) ...")
    image_path, truth = write_target_image(workdir, size, seed)
    print("3/8 starting `bioadapt serve`: embedded Hypha server on 127.0.0.1 and a local Ray ...")
    service = ServeProcess(workdir / "service", ["--allow-path", str(workdir), "--port", "0", "--user", "demo-user"],
                           log_path=workdir / "serve.log")
    try:
        info = service.start()
        print(f"    service {info['service_id']} at {info['server_url']} (Ray {info['ray']})")
        with connect(info["server_url"], token=info["token"], workspace=info["workspace"]) as svc:
            summary = _one_round(svc, workdir, base, image_path, truth, n_patches, top_k, patch_size, epochs,
                                 mc_passes, seed)
    finally:
        service.stop(timeout_s=60)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(summary)
    return summary


def _one_round(svc: Any, workdir: Path, base: Path, image_path: Path, truth: np.ndarray, n_patches: int | None,
               top_k: int, patch_size: int | None, epochs: int, mc_passes: int | None, seed: int) -> dict[str, Any]:
    from bioadapt.service.client import DEFAULT_RANDOM_PATCHES, defaults

    model = svc.load_model(str(base))
    project = svc.create_project("demo: nuclei model -> crowded cells", model["id"],
                                 [{"uri": str(image_path), "mask": "auto"}],
                                 description="bioadapt demo: one active-learning round")
    project_id, image_id = project["id"], project["images"][0]["id"]
    given = {"n_patches": n_patches, "patch_shape": [patch_size] * 2 if patch_size else None, "mc_passes": mc_passes}
    used = {**defaults("score"), "n_patches": DEFAULT_RANDOM_PATCHES,
            **{k: v for k, v in given.items() if v is not None}}  # what the service will use
    print(f"4/8 scoring up to {used['n_patches']} patches of {' x '.join(map(str, used['patch_shape']))} (as many "
          f"as fit inside the tissue without overlapping) with MC-dropout BALD (T = {used['mc_passes']}) on Ray "
          "actors; the service's default strategy picks from them ...")
    job = svc.score(project_id, **{k: v for k, v in given.items() if v is not None}, seed=seed)
    scoring = svc.wait(job["job_id"])
    strategy = scoring["result"]["strategy"]
    print(f"    {scoring['progress'].get('done')} patches scored")
    top = svc.list_patches(project_id, limit=top_k)  # the service's picks first, in their order
    print(f"5/8 the simulated annotator corrects the {len(top)} patches the service picked ({strategy}) ...")
    shown = []
    for patch in tqdm(top, desc="correct patches", unit="patch"):
        window = tuple(slice(o, o + s) for o, s in zip(patch["origin"], patch["shape"]))
        if len(shown) < 4:
            shown.append(svc.get_patch(project_id, patch["id"]))
        svc.submit_labels(project_id, patch["id"], truth[window].astype(np.uint32))
    print(f"6/8 fine-tuning on the corrected patches ({epochs} epochs) on a Ray actor ...")
    job = svc.fine_tune(project_id, epochs=epochs, learning_rate=LEARNING_RATE, batch_size=4)
    tuned = svc.wait(job["job_id"])
    version = tuned["result"]["version"]
    verdict = tuned["result"]["verdict"]
    judged_on = "by cross-validation" if verdict.get("judged_by") == "cross-validation" else "on the held-out patches"
    print(f"    version {version} against version 0 {judged_on}: {verdict['verdict']} ({verdict['reason']})")
    print(f"7/8 evaluating versions 0 and {version} on the held-out corrected patches ...")
    evaluation = svc.wait(svc.evaluate(project_id, versions=[0, version]))["result"]
    print("8/8 exporting the fine-tuned model as a bioimage.io package and testing it ...")
    export_job = svc.wait(svc.export_model(project_id, version=version, authors=["bioadapt demo"], license="MIT"))
    package = workdir / f"demo-model-v{version}.zip"  # fetched through the service, as a remote client would
    package.write_bytes(bytes(svc.job_output(export_job["id"], "package")))
    test_status = _test_package(package)
    png = _summary_png(workdir / "summary.png", svc, project_id, image_id, shown, truth, version)
    before, after = evaluation["versions"]["0"], evaluation["versions"][str(version)]
    return {"project": project_id, "model": model["info"]["name"], "image": str(image_path),
            "scored": scoring["progress"].get("done"), "patches_per_second": scoring["progress"].get(
                "patches_per_second"), "strategy": strategy, "picked_scores": [round(p["score"], 4) for p in top],
            "median_score": float(np.median([p["score"] for p in svc.list_patches(project_id, limit=10_000)])),
            "annotated": len(top), "holdout_patches": evaluation["holdout_patches"],
            "training": {k: tuned["result"]["result"].get(k) for k in ("epochs_run", "best_epoch", "seconds",
                                                                        "initial_val_score", "best_val_score",
                                                                        "val_metric")},
            "f1_before": before.get("f1"), "f1_after": after.get("f1"), "ap_before": before.get("ap"),
            "ap_after": after.get("ap"), "version": version, "package": str(package),
            "learning_curve": svc.get_project(project_id)["learning_curve"],
            "package_test": test_status, "png": str(png)}


def _test_package(path: Path) -> str:
    from bioimageio.core import test_model

    return test_model(str(path)).status


def _summary_png(out: Path, svc: Any, project_id: str, image_id: str, shown: list[dict[str, Any]],
                 truth: np.ndarray, version: int) -> Path:
    """Top patches: image, uncertainty overlay, base and fine-tuned predictions, ground truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.color import label2rgb

    columns = ["image", "uncertainty (where MC passes disagree)", "base model (v0)", f"fine-tuned (v{version})", "ground truth"]
    figure, axes = plt.subplots(len(shown), len(columns), figsize=(3 * len(columns), 3 * len(shown)),
                                squeeze=False)
    for row, patch in enumerate(shown):
        image = patch["image"][0].astype(np.float32)
        window = tuple(slice(o, o + s) for o, s in zip(patch["origin"], patch["shape"]))
        job = svc.wait(svc.predict(project_id, image_id, patch["origin"], patch["shape"], version=version,
                                   return_array=True), progress=False)
        tuned = svc.job_output(job["id"], "labels")
        panels = [image, image, label2rgb(patch["predicted_labels"], image / max(image.max(), 1e-6), bg_label=0),
                  label2rgb(tuned, image / max(image.max(), 1e-6), bg_label=0),
                  label2rgb(truth[window], image / max(image.max(), 1e-6), bg_label=0)]
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel, cmap="gray")
            if col == 1:
                ax.imshow(patch["uncertainty"], cmap="magma", alpha=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col])
        axes[row, 0].set_ylabel(f"patch {patch['id']}\nscore {patch['score']:.4g}")
    figure.tight_layout()
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return out


def _print_summary(summary: dict[str, Any]) -> None:
    training = summary["training"]
    print("\nSummary")
    print(f"  model      {summary['model']} -> project {summary['project']}")
    picked = summary["picked_scores"]
    print(f"  scoring    {summary['scored']} patches, {summary['patches_per_second']} patches/s; "
          f"{summary['annotated']} picked by {summary['strategy']}, scores {max(picked):.4g} .. {min(picked):.4g} "
          f"(median of all {summary['median_score']:.4g})")
    print(f"  training   {training['epochs_run']} epochs in {training['seconds']} s, best epoch "
          f"{training['best_epoch']}, validation {'F1' if training['val_metric'] == 'f1' else 'Dice'} "
          f"{training['initial_val_score']:.3f} -> "
          f"{training['best_val_score']:.3f}")
    print(f"  F1 @ IoU 0.5 on {summary['holdout_patches']} held-out corrected patches: "
          f"{summary['f1_before']:.3f} (v0) -> {summary['f1_after']:.3f} (v{summary['version']});  "
          f"AP {summary['ap_before']:.3f} -> {summary['ap_after']:.3f}")
    print("  learning curve (held-out score of each fine-tune and of its parent, on the same patches):")
    for row in summary["learning_curve"]:
        print(f"    v{row['parent']} -> v{row['version']}: {row['parent_labels']} -> {row['labels']} training labels, "
              f"{row['metric']} {_score(row['parent_score'])} -> {_score(row['score'])} on {row['holdout_patches']} "
              f"patches: {row['verdict']}")
    print(f"  package    {summary['package']}  (bioimageio.core test: {summary['package_test']})")
    print(f"  figure     {summary['png']}")
    print(f"  time       {summary['seconds']} s")


def _score(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"
