"""Running `bioadapt serve` in tests: a subprocess joined to the session's Hypha server and Ray, and clients for
test users (tokens minted with the server's JWT secret)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bioadapt.service.client import BioadaptClient, connect
from bioadapt.service.hypha_server import mint_token

SERVICE_WS = "ws-user-svc"
START_TIMEOUT_S = 90


class ServiceProcess:
    """A `bioadapt serve` subprocess joined to an existing Hypha server and Ray cluster."""

    def __init__(self, hypha_server, ray_cluster, user: str, data_dir: Path, allow: list[Path]):
        self.user, self.data_dir, self.log = user, data_dir, data_dir.parent / f"{data_dir.name}-serve.log"
        token = mint_token(user, jwt_secret=hypha_server.jwt_secret, expires_in=3600)
        self.command = [sys.executable, "-m", "bioadapt.cli", "serve", "--server-url", hypha_server.url,
                        "--token", token, "--workspace", f"ws-user-{user}", "--ray-address",
                        ray_cluster["address"], "--data-dir", str(data_dir)]
        for folder in allow:
            self.command += ["--allow-path", str(folder)]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # ray.init() in this process (the ray_cluster fixture) turned Ray 2.60's token auth on by setting
        # RAY_AUTH_MODE=token here (and wrote ~/.ray/auth_token). A process joining the cluster without that
        # variable fails to connect ("Failed to connect to Ray cluster", after ~20 s): pass the mode on.
        if "RAY_AUTH_MODE" not in self.env and (Path.home() / ".ray" / "auth_token").exists():
            self.env["RAY_AUTH_MODE"] = "token"
        self.process: subprocess.Popen | None = None
        self.info: dict | None = None

    def start(self) -> dict:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env)
        connection = self.data_dir / "connection.json"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"bioadapt serve exited with {self.process.returncode}:\n{self.output()}")
            try:  # a file left by a killed earlier process names that process's pid
                info = json.loads(connection.read_text())
                if info["pid"] == self.process.pid:
                    self.info = info
                    return info
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"bioadapt serve wrote no {connection} within {START_TIMEOUT_S} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else "(no output)"

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=15)

    def stop(self) -> int | None:
        """SIGTERM by pid, SIGKILL after 15 s; the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)
        return self.process.returncode


def client_for(hypha_server, user: str, workspace: str = SERVICE_WS) -> BioadaptClient:
    token = mint_token(user, workspaces={workspace: "r"}, jwt_secret=hypha_server.jwt_secret)
    return connect(hypha_server.url, token=token, workspace=workspace)


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
