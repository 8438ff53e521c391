"""An embedded Hypha server run as a child process, and test-user tokens for it.

Run as ``python -m bioadapt.service.hypha_server [hypha.server options]`` this module is the launcher:
it runs ``hypha.server`` exactly as ``python -m hypha.server`` would, but with uvicorn's websocket
per-message-deflate turned off (hypha 0.21.137 has no option for it; compressing every message made big
numpy arrays travel at ~20 MB/s).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from bioadapt.errors import BioadaptError

#: Per-client websocket message limits used with ``fast_transfer`` (hypha's defaults: 200/s, burst
#: 2000 — a big array sent in 256 KiB chunks without compression hits them and the sender is dropped).
FAST_TRANSFER_ENV = {"HYPHA_WS_MSG_RATE_LIMIT": "10000", "HYPHA_WS_MSG_BURST_LIMIT": "100000"}


@dataclass
class HyphaServer:
    """A running Hypha server child process; ``stop()`` it or use it as a context manager."""

    url: str
    port: int
    process: subprocess.Popen
    jwt_secret: str | None = None
    log_file: Path | None = None
    _own_log: bool = field(default=False, repr=False)
    _own_database: Path | None = field(default=None, repr=False)  # hypha's event log, ours to delete

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[len("http"):] + "/ws"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the server by its pid, wait, SIGKILL it after ``timeout_s``."""
        if self.process.poll() is None:
            try:
                os.kill(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        if self._own_log and self.log_file is not None:
            self.log_file.unlink(missing_ok=True)
        if self._own_database is not None:
            self._own_database.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, n_chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n_chars:]
    except OSError:
        return "(no log)"


def start_hypha_server(host: str = "127.0.0.1", port: int | None = None, *, jwt_secret: str | None = None,
                       fast_transfer: bool = True, log_file: str | Path | None = None, timeout_s: float = 60,
                       extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> HyphaServer:
    """Start ``hypha.server`` on ``host:port`` (a free port when None) and wait until it is ready.

    ``jwt_secret`` becomes the child's ``HYPHA_JWT_SECRET`` so that :func:`mint_token` with the same secret
    makes tokens it accepts; when None the child inherits the variable from this process's environment
    (or hypha picks a random secret). ``fast_transfer`` turns websocket compression off and raises the
    per-client message rate limits (values already present in ``env``/the environment win).
    ``extra_args`` are more ``hypha.server`` options; ``env`` adds variables to the child's environment.
    The server output goes to ``log_file`` (a temporary file, deleted on ``stop()``, when None). Without a
    ``--database-uri`` among ``extra_args``, hypha's event-log SQLite file is a temporary one deleted on ``stop()``
    (hypha's own temporary file outlives a server stopped by a signal).
    """
    port = _free_port(host) if port is None else int(port)
    child_env = {**os.environ, **(env or {})}
    if jwt_secret is not None:
        child_env["HYPHA_JWT_SECRET"] = child_env["JWT_SECRET"] = jwt_secret
    if fast_transfer:
        for key, value in FAST_TRANSFER_ENV.items():
            child_env.setdefault(key, value)
        child_env["BIOADAPT_PARENT_PID"] = str(os.getpid())
    module = "bioadapt.service.hypha_server" if fast_transfer else "hypha.server"
    own_database = None
    if not any(arg.startswith("--database-uri") for arg in extra_args):
        own_database = _temporary_file(".db")
        extra_args = [*extra_args, f"--database-uri=sqlite+aiosqlite:///{own_database}"]
    command = [sys.executable, "-m", module, f"--host={host}", f"--port={port}", *extra_args]

    own_log = log_file is None
    if own_log:
        log_file = _temporary_file(".log")
    log_path = Path(log_file)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=child_env, start_new_session=True)
    server = HyphaServer(url=f"http://{host}:{port}", port=port, process=process, jwt_secret=jwt_secret,
                         log_file=log_path, _own_log=own_log, _own_database=own_database)

    deadline = time.monotonic() + timeout_s
    problem = f"it was not ready within {timeout_s} s"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            problem = f"it exited with status {process.returncode}"
            break
        try:
            with urllib.request.urlopen(f"{server.url}/health/readiness", timeout=2) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    tail = _log_tail(log_path)
    server._own_log = False  # keep the log for the user to read
    server.stop()
    raise BioadaptError(f"The Hypha server ({' '.join(command)}) did not start: {problem}. "
                        f"Check that port {port} is free and the hypha install works; log {log_path}, "
                        f"last lines:\n{tail}")


def mint_token(user_id: str, *, workspaces: dict[str, str] | None = None, email: str | None = None,
               roles: Sequence[str] | None = None, expires_in: int = 3600, jwt_secret: str) -> str:
    """A signed user token (HS256) for a Hypha server started with the same ``jwt_secret``.

    Made as Hypha's own tests do, with ``hypha.core.auth.generate_auth_token``. ``workspaces`` grants
    permissions on other workspaces: ``{"ws-user-svc": "r" | "rw" | "a"}``. Hypha reads its secret from
    ``HYPHA_JWT_SECRET`` when ``hypha.core.auth`` is first imported and signs with a module global, so this
    calls ``hypha.core.auth.set_jwt_secret(jwt_secret)``: that also sets ``HYPHA_JWT_SECRET`` and
    ``JWT_SECRET`` in this process's ``os.environ`` (inherited by children started afterwards).
    """
    from hypha.core import UserInfo
    from hypha.core.auth import create_scope, generate_auth_token, set_jwt_secret

    set_jwt_secret(jwt_secret)
    scope = create_scope(workspaces=dict(workspaces or {}))
    user = UserInfo(id=user_id, is_anonymous=False, email=email, roles=list(roles or []), scope=scope)

    def generate() -> str:
        return asyncio.run(generate_auth_token(user, expires_in))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return generate()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # called from inside an event loop
        return pool.submit(generate).result()


def _die_with_parent(parent: int) -> None:
    """Linux: get SIGTERM when the process that started us dies, even by SIGKILL (no orphaned servers)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _launch(argv: Sequence[str]) -> None:
    """Run ``hypha.server`` as ``__main__`` with websocket per-message-deflate off."""
    import functools
    import runpy

    import uvicorn

    if os.environ.get("BIOADAPT_PARENT_PID", "").isdigit():
        _die_with_parent(int(os.environ["BIOADAPT_PARENT_PID"]))

    uvicorn.run = functools.partial(uvicorn.run, ws_per_message_deflate=False)
    sys.argv = ["hypha.server", *argv]
    runpy.run_module("hypha.server", run_name="__main__", alter_sys=True)


def _temporary_file(suffix: str) -> Path:
    """An empty file of ours in the system's temporary folder (the server's log or event database)."""
    handle, name = tempfile.mkstemp(prefix="bioadapt-hypha-", suffix=suffix)
    os.close(handle)
    return Path(name)


if __name__ == "__main__":
    _launch(sys.argv[1:])
