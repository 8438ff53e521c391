"""Shared fixtures: synthetic OME-Zarr images and real local HTTP and S3 (moto) servers on 127.0.0.1; and the one
rule for tests whose component (a browser, PostgreSQL, an X server, npm packages) is missing: skip, or fail in CI."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import numpy as np
import pytest

from bioadapt.data.writer import write_ome_zarr


# -- components CI installs: missing in CI is a failure, not a skip ------------------------------------------------
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(component: str, reason: str) -> NoReturn:
    """Skip the test (or the module, when called at import) because ``component`` is missing, saying why. Under
    CI=true fail instead: `.ci/run` installs every such component, and a skip fails nothing, so CI would be green with
    a whole client untested."""
    if IN_CI:
        pytest.fail(f"{reason} [CI=true: .ci/run installs {component}, so this test must run, not skip]",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def import_or_missing(module: str, component: str, install: str) -> ModuleType:
    """``module`` imported, or :func:`missing` with how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing(component, f"cannot import {module} ({e}): {install}")


def needs(component: str, *, absent: bool, reason: str) -> pytest.MarkDecorator:
    """A mark for tests that need ``component``: when ``absent``, :func:`missing` runs before any fixture starts (no
    Ray or Hypha is started for a test that cannot run)."""
    return pytest.mark.needs_component(component=component, absent=absent, reason=reason)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_component: made by needs(): skips when the component is missing "
                            "(fails under CI=true)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs_component"):
        if mark.kwargs["absent"]:
            missing(mark.kwargs["component"], mark.kwargs["reason"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # the server answers, even if with an error status
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not start within {timeout_s} s")


def stop_process(process: subprocess.Popen) -> None:
    """Stop a server we started, by its process id, and wait for it."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def http_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("http-root")


@pytest.fixture(scope="session")
def http_server(http_root):
    """Python's static file server on 127.0.0.1 serving ``http_root``; yields its base URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                "--directory", str(http_root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(url)
        yield url
    finally:
        stop_process(process)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible server on 127.0.0.1; yields (endpoint URL, fsspec storage options)."""
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bioadapt", "AWS_SECRET_ACCESS_KEY": "bioadapt-secret"}
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for_http(endpoint)
        options = {"key": "bioadapt", "secret": "bioadapt-secret",
                   "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        yield endpoint, options
    finally:
        stop_process(process)


@pytest.fixture(scope="session")
def protected_s3():
    """moto's S3 server with authentication on: only the access key of an IAM user made here gets in (another
    key, or none, is refused). Yields (endpoint URL, fsspec storage options with that key, boto3 client)."""
    import json

    import boto3

    port = free_port()
    # moto checks credentials once it has answered INITIAL_NO_AUTH_ACTION_COUNT requests: enough to make the user
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "8"}
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for_http(endpoint)
        settings = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        iam = boto3.client("iam", aws_access_key_id="setup", aws_secret_access_key="setup", **settings)
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        iam.put_user_policy(UserName="reader", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        stranger = boto3.client("s3", aws_access_key_id="stranger", aws_secret_access_key="x", **settings)
        for _ in range(20):  # the requests left before moto starts checking
            try:
                stranger.list_buckets()
            except Exception:  # noqa: BLE001 - refused: credentials are checked from now on
                break
        else:
            raise RuntimeError("moto never started checking credentials")
        client = boto3.client("s3", aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"],
                              **settings)
        options = {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"], "client_kwargs": settings}
        yield endpoint, options, client
    finally:
        stop_process(process)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(params=["0.4", "0.5"])
def ngff_version(request) -> str:
    return request.param


@pytest.fixture
def cyx_image(tmp_path, ngff_version, rng):
    """A 2-channel 600 x 700 uint16 OME-Zarr (3 levels) and its data."""
    data = rng.integers(0, 4000, size=(2, 600, 700), dtype=np.uint16)
    path = write_ome_zarr(tmp_path / f"cyx-{ngff_version}.ome.zarr", data, "cyx", version=ngff_version,
                          chunks=(1, 128, 128), n_levels=3, scale=(1.0, 0.5, 0.5),
                          units={"y": "micrometer", "x": "micrometer"})
    return path, data


@pytest.fixture(scope="session")
def hypha_server():
    """An embedded Hypha server on 127.0.0.1 (fast transfer on) with a random JWT secret for the session.

    Yields the :class:`bioadapt.service.hypha_server.HyphaServer` handle; ``hypha_server.jwt_secret`` is
    the secret to pass to ``mint_token``.
    """
    import secrets

    from bioadapt.service.hypha_server import start_hypha_server

    server = start_hypha_server(jwt_secret=secrets.token_urlsafe(32))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole test session (2 CPUs, loopback); service processes started by tests join it
    at ``ray_cluster["address"]``."""
    import ray

    from bioadapt.service.execution import start_ray
    from bioadapt.service.worker_files import remove_orphans

    resources = start_ray(num_cpus=2)
    yield {**resources, "address": ray.get_runtime_context().gcs_address}
    ray.shutdown()
    remove_orphans(wait_s=10)  # the temporary folders of the session's model actors


# -- no error the service sends names its data folder ---------------------------------------------------------
_DATA_FOLDERS: set[str] = set()
_LEAKS: list[str] = []


def _check_message(where: str, text: str) -> None:
    for folder in _DATA_FOLDERS:
        if folder in text:
            _LEAKS.append(f"{where}: {text[:500]!r} names the data folder {folder}")


@pytest.fixture(scope="session", autouse=True)
def _watch_service_errors():
    """Every `bioadapt serve` a test starts records its data folder; every error a client call raises (and every
    job error a call answers) must not contain it. Checked after each test by ``_no_data_folder_in_errors``."""
    from bioadapt.service.client import BioadaptClient
    from bioadapt.service.serve_process import ServeProcess

    start, call = ServeProcess.start, BioadaptClient._call

    def started(self, *args, **kwargs):
        info = start(self, *args, **kwargs)
        _DATA_FOLDERS.update({info["data_dir"], str(self.data_dir.resolve()), str(self.data_dir.absolute())})
        return info

    def watched_call(self, function, /, **kwargs):
        try:
            answer = call(self, function, **kwargs)
        except Exception as e:
            _check_message(f"{function} raised", str(e))
            raise
        for item in answer if isinstance(answer, list) else [answer]:
            if isinstance(item, dict) and isinstance(item.get("error"), str):
                _check_message(f"{function} answered a job error", item["error"])
        return answer

    patch = pytest.MonkeyPatch()
    patch.setattr(ServeProcess, "start", started)
    patch.setattr(BioadaptClient, "_call", watched_call)
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _no_data_folder_in_errors():
    yield
    leaks, _LEAKS[:] = list(_LEAKS), []
    assert not leaks, "errors that name the service's data folder:\n" + "\n".join(leaks)


@pytest.fixture
def mask_draws(monkeypatch) -> list:
    """Records every dropout mask ``CommonMasks`` draws (its shape), to count what a round redraws."""
    from bioadapt.adapters.dropout import CommonMasks

    draws: list = []
    keep = CommonMasks._keep
    monkeypatch.setattr(CommonMasks, "_keep", lambda self, *a: draws.append(a[0]) or keep(self, *a))
    return draws
