"""RPC cost through a Hypha server on 127.0.0.1: latency of a small call and MB/s of get_patch / submit_labels.

A Hypha server is started twice: with hypha's defaults (websocket per-message-deflate on, message rate limit
200/s) and with bioadapt's settings (`fast_transfer`: deflate off, higher rate limits; what `bioadapt serve`
uses for its embedded server). Each time a real `bioadapt serve --server-url` registers the service and a
client (another process: this one) makes a project with one synthetic image, scores patches of 256 x 256 and
1024 x 1024 (so they exist), then times:

- small call: ``job_status`` (a database read), median and p90 of 200 calls;
- get_patch: image (its own dtype) + predicted labels (uint32) + uncertainty (float32) of one patch, MB/s;
- submit_labels: a uint32 label array of the patch's shape, MB/s.

Targets (issue 7): small call p50 < 10 ms; patch transfer >= 50 MB/s.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results" / "rpc.json"


def measure(fast_transfer: bool, root: Path, model: Path, image: Path) -> dict:
    from bioadapt.service.client import connect
    from bioadapt.service.hypha_server import mint_token, start_hypha_server
    from bioadapt.service.serve_process import ServeProcess

    secret = "bench-" + os.urandom(16).hex()
    hypha = start_hypha_server(jwt_secret=secret, fast_transfer=fast_transfer)
    service = ServeProcess(root / f"service-{'fast' if fast_transfer else 'default'}",
                           ["--server-url", hypha.url, "--token", mint_token("bench-svc", jwt_secret=secret),
                            "--workspace", "ws-user-bench-svc", "--allow-path", str(root),
                            "--num-cpus", str(os.cpu_count())])
    try:
        service.start()
        token = mint_token("bench-user", workspaces={"ws-user-bench-svc": "r"}, jwt_secret=secret)
        svc = connect(hypha.url, token=token, workspace="ws-user-bench-svc")
        project = svc.create_project("rpc benchmark", str(model), [{"uri": str(image)}])
        figures: dict = {}
        for side in (256, 1024):
            job = svc.score(project["id"], n_patches=2, patch_shape=[side, side], mc_passes=2, seed=side)
            svc.wait(job["job_id"], progress=False)
        patches = {p["shape"][0]: p["id"] for p in svc.list_patches(project["id"], limit=100)}
        seconds = []
        for _ in range(200):
            started = time.perf_counter()
            svc.job_status(job["job_id"])
            seconds.append(time.perf_counter() - started)
        figures["small_call_ms"] = {"p50": round(1000 * statistics.median(seconds), 2),
                                    "p90": round(1000 * float(np.percentile(seconds, 90)), 2)}
        for side, patch_id in sorted(patches.items()):
            got, sent = [], []
            labels = np.random.default_rng(0).integers(0, 500, (side, side), dtype=np.uint32)
            for _ in range(5 if side == 1024 else 20):
                started = time.perf_counter()
                patch = svc.get_patch(project["id"], patch_id)
                elapsed = time.perf_counter() - started
                nbytes = sum(patch[k].nbytes for k in ("image", "predicted_labels", "uncertainty"))
                got.append(nbytes / elapsed / 1e6)
                started = time.perf_counter()
                svc.submit_labels(project["id"], patch_id, labels)
                sent.append(labels.nbytes / (time.perf_counter() - started) / 1e6)
            figures[f"{side}x{side}"] = {"get_patch_MB_per_s": round(statistics.median(got), 1),
                                         "get_patch_MB": round(nbytes / 1e6, 2),
                                         "submit_labels_MB_per_s": round(statistics.median(sent), 1),
                                         "submit_labels_MB": round(labels.nbytes / 1e6, 2)}
        svc.disconnect()
        return figures
    finally:
        service.stop(timeout_s=60)
        hypha.stop()


def main() -> None:
    from bioadapt.adapters.unet import UNet
    from bioadapt.data.synthetic import write_synthetic_ome_zarr
    from bioadapt.exporters.fresh import package_new_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_ome_zarr(root / "image.ome.zarr", (4096, 4096), "nuclei", seed=0)
        kwargs = dict(in_channels=1, out_channels=2, dims=2, features=4, depth=2)
        torch.manual_seed(0)
        model = package_new_model(UNet(**kwargs).eval(), root / "model.zip", name="benchmark U-Net",
                                  architecture_kwargs=kwargs, weights=("pytorch_state_dict",))
        result = {"hypha_defaults": measure(False, root, model, root / "image.ome.zarr"),
                  "fast_transfer": measure(True, root, model, root / "image.ome.zarr"),
                  "fast_transfer_settings": "uvicorn ws_per_message_deflate=False (launcher module), "
                                            "HYPHA_WS_MSG_RATE_LIMIT=10000, HYPHA_WS_MSG_BURST_LIMIT=100000",
                  "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(result, indent=2))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
