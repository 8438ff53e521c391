"""`bioadapt serve`: register the service on a Hypha server (an embedded one on 127.0.0.1 by default), with Ray
(embedded, or joined by address) doing the heavy work; clean shutdown on SIGINT / SIGTERM."""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bioadapt.errors import BioadaptError
from bioadapt.service.limits import Limits
from bioadapt.service.worker_files import remove_orphans

log = logging.getLogger(__name__)
DEFAULT_PORT = 9527
SERVICE_USER = "bioadapt"
CONNECTION_FILE = "connection.json"
STOP_WAIT_S = 10  # how long a stopping service waits for its calls and jobs before it shuts Ray down


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "bioadapt"


@dataclass
class ServeOptions:
    server_url: str | None = None
    workspace: str | None = None
    token: str | None = None
    ray_address: str | None = None
    data_dir: str | Path | None = None
    database_url: str | None = None
    public: bool = False
    allow_paths: list[str] = field(default_factory=list)
    port: int | None = None
    num_cpus: int | None = None
    device: str = "auto"
    actor_idle_s: float | None = None  # how long idle model actors stay loaded (None: the service's default)
    user: str | None = None  # who the printed token is for (embedded server)
    limits: Limits | None = None  # per-user calls and jobs at once (default: Limits.from_env())
    remote_timeout: float | None = None  # read timeout of http(s) / s3 images, seconds (default 30)


def _secret(data_dir: Path) -> str:
    """The embedded server's JWT secret, kept in the data folder so printed tokens outlive a restart."""
    path = data_dir / ".hypha-jwt-secret"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32))
    return path.read_text().strip()


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # containers without a passwd entry
        return "local-user"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


async def _serve(options: ServeOptions, stop: asyncio.Event) -> None:
    from hypha_rpc import connect_to_server

    from bioadapt.service.api import BioadaptService
    from bioadapt.service.execution import start_ray
    from bioadapt.service.hypha_service import SERVICE_ID, CallPools, build_service
    from bioadapt.service.web import register_web_page

    data_dir = Path(options.data_dir or default_data_dir()).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if options.remote_timeout:  # an environment variable: the Ray workers this process starts read it too
        from bioadapt.data.stores import TIMEOUT_VARIABLE

        os.environ[TIMEOUT_VARIABLE] = str(options.remote_timeout)
    hypha = None
    user_token = None
    if options.server_url is None:
        from bioadapt.service.hypha_server import mint_token, start_hypha_server

        secret = _secret(data_dir)
        if options.port is None:
            port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else None
        else:
            port = options.port or None  # 0: any free port
        hypha = start_hypha_server(port=port, jwt_secret=secret, log_file=data_dir / "hypha-server.log")
        server_url = hypha.url
        service_token = mint_token(SERVICE_USER, jwt_secret=secret, expires_in=365 * 86400)
        workspace = f"ws-user-{SERVICE_USER}"
        user_token = mint_token(options.user or _login(), workspaces={workspace: "r"},
                                jwt_secret=secret, expires_in=30 * 86400)
    else:
        server_url, service_token, workspace = options.server_url, options.token, options.workspace
    try:
        resources = await asyncio.to_thread(start_ray, options.ray_address, options.num_cpus)
        tuning = {} if options.actor_idle_s is None else {"actor_idle_s": options.actor_idle_s}
        api = await asyncio.to_thread(BioadaptService, data_dir, database_url=options.database_url,
                                      allow_paths=options.allow_paths, public=options.public, device=options.device,
                                      limits=options.limits, **tuning)
        config: dict[str, Any] = {"server_url": server_url}
        if service_token:
            config["token"] = service_token
        if workspace:
            config["workspace"] = workspace
        server = await connect_to_server(config)
        workspace = server.config.workspace
        pools = CallPools()
        registered = await server.register_service(build_service(api, public=options.public, pools=pools))
        web_url = await register_web_page(server, server_url)
        info = {"server_url": server_url, "workspace": workspace, "service_id": f"{workspace}/{SERVICE_ID}",
                "full_service_id": registered["id"], "web_url": web_url, "token": user_token,
                "data_dir": str(data_dir),
                "ray": {k: v for k, v in resources.items() if k in ("CPU", "GPU")}, "pid": os.getpid(),
                "interrupted_jobs_marked_failed": api.interrupted}
        (data_dir / CONNECTION_FILE).write_text(json.dumps(info, indent=2))
        os.chmod(data_dir / CONNECTION_FILE, 0o600)
        _print_connection(info)
        await stop.wait()
        print("bioadapt serve: stopping", flush=True)
        try:
            await server.unregister_service(registered["id"])  # no new calls
            await server.disconnect()
        except Exception as e:  # the server may already be gone
            log.info("while disconnecting: %s", e)
        await asyncio.to_thread(_finish, api, pools, STOP_WAIT_S)
    finally:
        (data_dir / CONNECTION_FILE).unlink(missing_ok=True)
        import ray

        if ray.is_initialized():
            ray.shutdown()
            remove_orphans(wait_s=5.0 if options.ray_address is None else 0.0)  # its workers' temporary files
        if hypha is not None:
            hypha.stop()


def _finish(api: Any, pools: Any, timeout_s: float) -> None:
    """Cancel the jobs and let them and the calls in flight end (up to ``timeout_s``) before Ray goes down: a
    thread still inside Ray while it shuts down can abort the process."""
    deadline = time.monotonic() + timeout_s
    runners = api.jobs.running()
    for runner in runners:
        runner.cancel()
    calls_ended = pools.close(timeout_s)
    api.close(wait_s=max(0.0, deadline - time.monotonic()))  # the jobs end, then the idle actors stop
    if not calls_ended or any(r.thread.is_alive() for r in runners):
        log.warning("bioadapt serve: calls or jobs still running after %s s; stopping anyway", timeout_s)


def _print_connection(info: dict[str, Any]) -> None:
    token = info["token"]
    print(f"bioadapt service ready\n"
          f"  server     {info['server_url']}\n"
          f"  workspace  {info['workspace']}\n"
          f"  service    {info['service_id']}\n"
          + (f"  token      {token}\n" if token else "")
          + f"  data       {info['data_dir']}  (connection details in {CONNECTION_FILE})\n"
          f"  ray        {info['ray']}\n"
          + (f"  web page   {info['web_url']}  (paste the token there)\n" if info["web_url"] else "")
          + f"Python:  from bioadapt.service.client import connect\n"
          f"         svc = connect({info['server_url']!r}, token=<token>, workspace={info['workspace']!r})",
          flush=True)


def _stopper(stop: asyncio.Event) -> Callable[[], None]:
    def on_signal() -> None:
        # ray.init() puts absl's failure-signal handler in front of ours: it logs "*** SIGTERM received ***", calls
        # this handler, and leaves an alarm that abort()s the process 3 s later (exit status -6 whenever stopping
        # took longer). The stop is wanted, not a crash: cancel that alarm.
        signal.alarm(0)
        stop.set()

    return on_signal


def serve(options: ServeOptions) -> None:
    """Run until SIGINT or SIGTERM (then stop calls, jobs, Ray and Hypha in that order)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _stopper(stop))
        await _serve(options, stop)

    try:
        asyncio.run(main())
    except BioadaptError:
        raise
    except OSError as e:
        raise BioadaptError(f"the service could not start: {e}") from e
