"""Fairness of a real `bioadapt serve` (joined to its own Hypha server on 127.0.0.1, embedded Ray): does one user's
slow work delay another user's quick calls, and do 16 annotators labelling at once lose anything?

1. Quick calls, alone and under a hammer. A "quick" user loops over list_projects, get_project, list_patches and
   job_status (a 50 ms pause between calls) and records each call's latency: first alone, then while a "hammer"
   user keeps 6 slow calls in flight: 4 threads call add_image on an http store that accepts connections and never
   answers (each call lasts the read timeout, 5 s here), 2 threads call score(n_patches=10,000, patch_shape=[16, 16])
   (sampling and 10,000 patch rows inside the call) and cancel the job it starts. Target: quick-call p99 < 1 s.
2. Label load. 16 users, each with a project of 32 pending 64 x 64 patches, submit labels as fast as they can for
   60 s (each label array carries the client and sequence number); afterwards every patch must hold the last
   labels acknowledged for it (0 lost). Latency p50 / p99 and throughput.

Usage: python benchmarks/bench_fairness.py [--seconds 60] (writes benchmarks/results/fairness.json). Run it on an
otherwise idle machine: on 2 shared cores other processes' load lands in the percentiles.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "fairness.json"
WORKSPACE = "ws-user-fairness-svc"
REMOTE_TIMEOUT_S = 5
PAUSE_S = 0.05


class SilentServer:
    """Accepts connections on 127.0.0.1 and never answers: an http image store that hangs."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(512)
        self.port = self.socket.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.socket.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.socket.close()
        for connection in self.accepted:
            connection.close()


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"calls": 0}
    ms = 1000 * np.asarray(seconds)
    return {"calls": len(seconds), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1)}


def quick_calls(client, project_id: str, job_id: str, seconds: float) -> list[float]:
    calls = [client.list_projects, lambda: client.get_project(project_id),
             lambda: client.list_patches(project_id, limit=20), lambda: client.job_status(job_id)]
    latencies, deadline, i = [], time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            calls[i % len(calls)]()
        except Exception as e:  # noqa: BLE001 - a timed-out quick call is a result, kept as its duration
            print(f"  quick call failed after {time.perf_counter() - started:.1f} s: {str(e)[:200]}")
        latencies.append(time.perf_counter() - started)
        i += 1
        time.sleep(PAUSE_S)
    return latencies


def hammer(client, root: Path, image: Path, model_id: str, silent: SilentServer, stop: threading.Event) -> dict:
    """6 slow calls in flight until ``stop``: 4 hanging add_image, 2 big draws (fresh projects when one fills)."""
    counts = {"add_image": 0, "score": 0, "refused": 0, "errors": []}
    url = f"http://127.0.0.1:{silent.port}/slide.ome.zarr"
    target = client.create_project("hammer target", model_id, [])

    def hang() -> None:
        while not stop.is_set():
            try:
                client.add_image(target["id"], url)
            except Exception as e:  # noqa: BLE001 - the expected outcome: a timeout
                counts["add_image"] += 1
                if "did not answer" not in str(e):
                    counts["errors"].append(str(e)[:200])

    def draw() -> None:
        project, draws = None, 0
        while not stop.is_set():
            if project is None or draws == 5:
                project, draws = client.create_project("hammer draws", model_id, [{"uri": str(image)}]), 0
            try:
                job = client.score(project["id"], n_patches=10_000, patch_shape=[16, 16], mc_passes=2)
                counts["score"] += 1
                draws += 1
                client.cancel_job(job["job_id"])
            except Exception as e:  # noqa: BLE001 - a refusal (job limit) is a fast answer too
                counts["refused"] += 1
                if "jobs" not in str(e):
                    counts["errors"].append(str(e)[:200])
                time.sleep(0.5)

    threads = [threading.Thread(target=hang, daemon=True) for _ in range(4)]
    threads += [threading.Thread(target=draw, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    return {"threads": threads, "counts": counts}


def label_load(connect_user, model_id_of, image: Path, clients: int, seconds: float) -> dict:
    """``clients`` users label their own project's 32 patches for ``seconds``; then check nothing was lost."""
    users = [connect_user(f"annotator-{i}") for i in range(clients)]
    projects, patches = [], []
    for i, client in enumerate(users):
        project = client.create_project(f"labels {i}", model_id_of(client), [{"uri": str(image)}])
        job = client.score(project["id"], n_patches=32, patch_shape=[64, 64], mc_passes=2, seed=i)
        client.cancel_job(job["job_id"])
        projects.append(project["id"])
        patches.append([p["id"] for p in client.list_patches(project["id"], order="id", limit=100)])
    last_sent: list[dict[int, int]] = [{} for _ in users]
    latencies: list[list[float]] = [[] for _ in users]
    failures: list[str] = []
    start = threading.Barrier(clients)

    def label(i: int) -> None:
        client, sequence = users[i], 0
        start.wait()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            patch_id = patches[i][sequence % len(patches[i])]
            value = 1 + i * 1_000_000 + sequence
            started = time.perf_counter()
            try:
                client.submit_labels(projects[i], patch_id, np.full((64, 64), value, np.uint32))
                last_sent[i][patch_id] = value
            except Exception as e:  # noqa: BLE001 - counted
                failures.append(f"annotator-{i}: {str(e)[:200]}")
            latencies[i].append(time.perf_counter() - started)
            sequence += 1

    threads = [threading.Thread(target=label, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lost = 0
    for i, client in enumerate(users):
        for patch_id, value in last_sent[i].items():
            stored = client.get_patch(projects[i], patch_id).get("labels")
            lost += int(stored is None or not np.all(stored == value))
    for client in users:
        client.disconnect()
    every = [s for per_client in latencies for s in per_client]
    return {"clients": clients, "seconds": seconds, "acknowledged": len(every) - len(failures), "failed": len(failures),
            "failures": failures[:5], "lost": lost, "per_second": round(len(every) / seconds, 1),
            **percentiles(every)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60, help="length of each measured phase")
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()

    from bioadapt.adapters.unet import UNet
    from bioadapt.data.writer import write_ome_zarr
    from bioadapt.exporters.fresh import package_new_model
    from bioadapt.service.client import connect
    from bioadapt.service.hypha_server import mint_token, start_hypha_server
    from bioadapt.service.serve_process import ServeProcess
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        image = write_ome_zarr(root / "slide.ome.zarr", rng.integers(0, 255, (1, 4096, 4096), dtype=np.uint8), "cyx",
                               chunks=(1, 512, 512), n_levels=1)
        kwargs = dict(in_channels=1, out_channels=2, dims=2, features=4, depth=2)
        torch.manual_seed(0)
        model = package_new_model(UNet(**kwargs).eval(), root / "model.zip", name="fairness U-Net",
                                  architecture_kwargs=kwargs, weights=("pytorch_state_dict",))
        secret = "fairness-" + os.urandom(16).hex()
        hypha = start_hypha_server(jwt_secret=secret)
        service = ServeProcess(root / "service", ["--server-url", hypha.url, "--workspace", WORKSPACE,
                                                  "--token", mint_token("fairness-svc", jwt_secret=secret),
                                                  "--allow-path", str(root), "--num-cpus", "2"],
                               env={"BIOADAPT_REMOTE_TIMEOUT_S": str(REMOTE_TIMEOUT_S), "OMP_NUM_THREADS": "1"})
        silent = SilentServer()
        models: dict[str, str] = {}

        def connect_user(user: str):
            token = mint_token(user, workspaces={WORKSPACE: "r"}, jwt_secret=secret)
            return connect(hypha.url, token=token, workspace=WORKSPACE, method_timeout=60)

        def model_id_of(client) -> str:
            return client.load_model(str(model))["id"]

        try:
            service.start()
            quick, loud = connect_user("quick"), connect_user("hammer")
            project = quick.create_project("quick", model_id_of(quick), [{"uri": str(image)}])
            job = quick.score(project["id"], n_patches=20, patch_shape=[64, 64], mc_passes=2)["job_id"]
            quick.wait(job, progress=False)
            print("quick calls alone ...", flush=True)
            alone = quick_calls(quick, project["id"], job, args.seconds / 3)
            print("quick calls under the hammer ...", flush=True)
            stop = threading.Event()
            hammering = hammer(loud, root, image, model_id_of(loud), silent, stop)
            time.sleep(2)  # the slow calls are in
            loaded = quick_calls(quick, project["id"], job, args.seconds)
            stop.set()
            for thread in hammering["threads"]:
                thread.join(120)
            quick.disconnect()
            loud.disconnect()
            print("label load ...", flush=True)
            labels = label_load(connect_user, model_id_of, image, args.clients, args.seconds)
        finally:
            silent.close()
            service.stop(timeout_s=60)
            hypha.stop()
    result = {
        "quick_calls_alone": percentiles(alone),
        "quick_calls_under_hammer": percentiles(loaded),
        "hammer": {"slow_calls_in_flight": 6, "add_image_hanging_timeouts": hammering["counts"]["add_image"],
                   "score_draws_of_10000": hammering["counts"]["score"],
                   "score_refused_job_limit": hammering["counts"]["refused"],
                   "unexpected_errors": hammering["counts"]["errors"][:5]},
        "label_load": labels,
        "target": "quick-call p99 < 1000 ms under the hammer; label load 0 lost",
        "cpus": os.cpu_count(), "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(result, indent=2))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
