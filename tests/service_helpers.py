"""Running `bioadapt serve` in tests: a subprocess joined to the session's Hypha server and Ray, and clients for
test users (tokens minted with the server's JWT secret)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bioadapt.errors import BioadaptError
from bioadapt.service.client import SERVICE_ID, BioadaptClient, connect
from bioadapt.service.hypha_server import mint_token
from bioadapt.service.serve_process import ServeProcess

SERVICE_WS = "ws-user-svc"
START_TIMEOUT_S = 90


class ServiceProcess(ServeProcess):
    """A `bioadapt serve` subprocess joined to an existing Hypha server and Ray cluster."""

    def __init__(self, hypha_server, ray_cluster, user: str, data_dir: Path, allow: list[Path],
                 env: dict[str, str] | None = None, database_url: str | None = None, log_path: Path | None = None):
        token = mint_token(user, jwt_secret=hypha_server.jwt_secret, expires_in=3600)
        # idle model actors go after 2 s: services of several test modules share the session's 2-CPU Ray
        args = ["--server-url", hypha_server.url, "--token", token, "--workspace", f"ws-user-{user}",
                "--ray-address", ray_cluster["address"], "--actor-idle-s", "2"]
        for folder in allow:
            args += ["--allow-path", str(folder)]
        if database_url:
            args += ["--database-url", database_url]
        super().__init__(data_dir, args, env={**ray_env(), **(env or {})}, log_path=log_path)
        self.user = user

    def start(self, timeout_s: float = START_TIMEOUT_S) -> dict:
        try:
            return super().start(timeout_s)
        except BioadaptError as e:
            pytest.fail(str(e))


def project_folder(process: ServeProcess, project_id: str) -> Path:
    """Where a service this test started keeps a project's files. The service never sends paths of its own (a
    client may be on another machine); a test on the service's machine knows its layout."""
    return process.data_dir.resolve() / "projects" / project_id


def only_file(folder: Path, pattern: str) -> Path:
    """The one file in ``folder`` matching ``pattern``."""
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"{folder}: {pattern} matches {found}"
    return found[0]


def ray_env() -> dict[str, str]:
    """What a process joining the session's Ray needs in its environment. ray.init() in this process (the
    ray_cluster fixture) turned Ray 2.60's token auth on by setting RAY_AUTH_MODE=token here (and wrote
    ~/.ray/auth_token). A process joining the cluster without that variable fails to connect ("Failed to connect
    to Ray cluster", after ~20 s): pass the mode on."""
    if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").exists():
        return {"RAY_AUTH_MODE": "token"}
    return {}


def client_for(hypha_server, user: str, workspace: str = SERVICE_WS, service_id: str = SERVICE_ID
               ) -> BioadaptClient:
    """A client of ``user``; ``service_id`` a replica's full id (``connection.json``'s ``full_service_id``) to
    call that replica only."""
    token = mint_token(user, workspaces={workspace: "r"}, jwt_secret=hypha_server.jwt_secret)
    return connect(hypha_server.url, token=token, workspace=workspace, service_id=service_id)


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def ray_cpus_free(n: float = 2.0) -> bool:
    import ray

    return ray.available_resources().get("CPU", 0) >= n


def crowded_inputs(folder: Path, size: int) -> dict:
    """A synthetic 'crowded' OME-Zarr of ``size`` x ``size`` pixels with its ground truth, and a small U-Net
    package, in ``folder`` (a folder the service is allowed to read)."""
    import numpy as np
    import zarr
    from model_factory import unet_package

    from bioadapt.data.synthetic import write_synthetic_ome_zarr

    image = folder / "image.ome.zarr"
    write_synthetic_ome_zarr(image, (size, size), "crowded", seed=0)
    model = unet_package(folder / "model.zip", features=4, weights=("pytorch_state_dict",))
    truth = np.asarray(zarr.open_group(str(image), mode="r")["labels/ground_truth/0"][:])
    return {"allowed": folder, "image": image, "model": model, "truth": truth}
