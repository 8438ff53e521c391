"""The Python client: ``connect(server_url, token, workspace)`` gives the service's functions as typed methods,
``wait(job_id)`` with a progress bar, errors as BioadaptError / AccessDenied, a fresh service handle when the old
one expired (the service restarted), and a fresh connection when the websocket itself is gone (the embedded Hypha
server restarted with the service)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any, get_args

import numpy as np

from bioadapt.errors import AccessDenied, BioadaptError
from bioadapt.service.schemas import Acquisition

SERVICE_ID = "bioadapt"
ACQUISITIONS: tuple[str, ...] = get_args(Acquisition)  # what score(acquisition=...) takes
FINISHED = ("done", "failed", "cancelled")
RECONNECT_TIMEOUT_S = 120  # how long a call waits for a restarted server before it gives up
# errors that mean the handle is stale (the service restarted) and the call never ran: safe to re-fetch and retry;
# a timeout is not among them (the call may have run, and score / fine_tune must not start twice)
_EXPIRED = re.compile(r"Method (expired|not found)|Service not found|Session not found|not found: .*bioadapt|"
                      r"Client .* not found|Target peer .* not connected|Connection .* closed", re.IGNORECASE)
# errors raised before a message left: the websocket is gone (hypha-rpc gave up reconnecting, or the server
# refused the old session): only a new connection helps
_DISCONNECTED = re.compile(r"Connection is closed|WebSocket reconnection timed out|Server refused reconnection|"
                           r"not connected to the server", re.IGNORECASE)


def connect(server_url: str, token: str | None = None, workspace: str | None = None, *,
            service_id: str = SERVICE_ID, method_timeout: float = 300) -> "BioadaptClient":
    """Connect to a bioadapt service on a Hypha server (the URL, workspace and token `bioadapt serve` prints)."""
    config = {"server_url": server_url, "method_timeout": method_timeout}
    if token:
        config["token"] = token
    if workspace:
        config["workspace"] = workspace
    try:
        server = _open(config)
    except Exception as e:
        raise BioadaptError(f"cannot connect to the Hypha server at {server_url}: {e}. Check the URL (and token, "
                            "workspace) printed by `bioadapt serve`") from e
    try:
        return BioadaptClient(server, service_id, reopen=lambda: _open(config))
    except BioadaptError:
        server.disconnect()  # otherwise the connection lingers and keeps reconnecting
        raise


def _open(config: dict[str, Any]) -> Any:
    from hypha_rpc.sync import connect_to_server

    # A read-only grant on the service's workspace (what `bioadapt serve` hands out) cannot register the client's
    # built-in service there; hypha-rpc logs that as an error although calls and callbacks work.
    rpc_log = logging.getLogger("RPC")
    level = rpc_log.level
    rpc_log.setLevel(logging.CRITICAL)
    try:
        return connect_to_server(dict(config))
    finally:
        rpc_log.setLevel(level)


class BioadaptClient:
    """``reopen``: makes a new server connection (``connect`` passes one); without it a lost websocket is final."""

    def __init__(self, server: Any, service_id: str = SERVICE_ID, reopen: Callable[[], Any] | None = None):
        self.server = server
        self.service_id = service_id
        self._reopen = reopen
        self._service = self._fetch()

    def _fetch(self) -> Any:
        try:  # mode "random": several replicas of the service may share one workspace
            return self.server.get_service(self.service_id, {"mode": "random"})
        except Exception as e:
            raise BioadaptError(f"no service {self.service_id!r} reachable: {_message(e)}. Is `bioadapt serve` "
                                "running, and does your token give access to its workspace?") from e

    def _reconnect(self, cause: str) -> None:
        """A new websocket and service handle, retried while the server restarts (up to RECONNECT_TIMEOUT_S)."""
        if self._reopen is None:
            raise BioadaptError(f"the connection to the service is gone ({cause}); connect again")
        _quietly_disconnect(self.server)  # the old one would go on trying to reconnect
        deadline = time.monotonic() + RECONNECT_TIMEOUT_S
        delay = 0.5
        while True:
            try:
                self.server = self._reopen()
                self._service = self._fetch()
                return
            except Exception as e:  # the server or the service is not back yet
                if time.monotonic() + delay > deadline:
                    raise BioadaptError(f"the connection to the service was lost ({cause}) and it did not come back "
                                        f"within {RECONNECT_TIMEOUT_S} s: {_message(e)}") from e
            time.sleep(delay)
            delay = min(2 * delay, 5.0)

    def _call(self, function: str, /, **kwargs: Any) -> Any:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if callable(kwargs.get("progress")):
            # hypha-rpc drops a plain function argument when the call returns (score / fine_tune return a job id
            # at once); one inside an object marked _rintf stays callable until the service disposes of it
            kwargs["progress"] = {"_rintf": True, "on_progress": kwargs["progress"]}
        for attempt in range(3):
            try:
                return getattr(self._service, function)(**kwargs)
            except Exception as e:  # hypha-rpc raises plain Exceptions carrying the remote message
                message = _message(e)
                ours = message.startswith(("BioadaptError", "AccessDenied"))
                if attempt < 2 and not ours and _DISCONNECTED.search(message):
                    self._reconnect(message)
                    continue
                if attempt < 2 and not ours and _EXPIRED.search(message):
                    time.sleep(0.5 * (attempt + 1))
                    try:
                        self._service = self._fetch()
                    except BioadaptError:
                        continue
                    continue
                if message.startswith("AccessDenied: "):
                    raise AccessDenied(message.removeprefix("AccessDenied: ")) from None
                if message.startswith("BioadaptError: "):
                    raise BioadaptError(message.removeprefix("BioadaptError: ")) from None
                if type(e) is Exception:  # a remote error: the service's own words, without hypha-rpc's traceback
                    raise RuntimeError(message) from None
                raise
        raise BioadaptError(f"{function}: the service did not answer after re-connecting")

    # -- models and projects --------------------------------------------------------------------------
    def load_model(self, source: str, dropout_p: float = 0.05, mc_scope: str | None = None,
                   output_activation: str | None = None) -> dict[str, Any]:
        """Load a bioimage.io package or cellpose:<name or path>; returns {id, source, info}."""
        return self._call("load_model", source=source, dropout_p=dropout_p, mc_scope=mc_scope,
                          output_activation=output_activation)

    def list_models(self) -> list[dict[str, Any]]:
        return self._call("list_models")

    def create_project(self, name: str, model: str, images: list[dict[str, Any]] | None = None,
                       description: str = "", holdout_fraction: float = 0.25) -> dict[str, Any]:
        """images: [{"uri": ..., "axes": None, "channels": None, "mask": None | "auto" | label name}]."""
        return self._call("create_project", name=name, model=model, images=images or [], description=description,
                          holdout_fraction=holdout_fraction)

    def list_projects(self) -> list[dict[str, Any]]:
        return self._call("list_projects")

    def get_project(self, project_id: str) -> dict[str, Any]:
        return self._call("get_project", project_id=project_id)

    def delete_project(self, project_id: str) -> dict[str, Any]:
        return self._call("delete_project", project_id=project_id)

    def add_image(self, project_id: str, uri: str, axes: str | None = None, channels: list[int] | None = None,
                  mask: str | None = None) -> dict[str, Any]:
        return self._call("add_image", project_id=project_id, uri=uri, axes=axes, channels=channels, mask=mask)

    # -- the loop -------------------------------------------------------------------------------------
    def score(self, project_id: str, n_patches: int = 64, patch_shape: list[int] | tuple[int, ...] = (256, 256),
              mc_passes: int = 16, acquisition: str = "bald", image_id: str | None = None,
              version: int | None = None, seed: int = 0, rescore_pending: bool = False, actors: int | None = None,
              progress: Callable[[dict], Any] | None = None) -> dict[str, Any]:
        """Start scoring new patches; returns {job_id, patches}."""
        return self._call("score", project_id=project_id, n_patches=n_patches, patch_shape=list(patch_shape),
                          mc_passes=mc_passes, acquisition=acquisition, image_id=image_id, version=version, seed=seed,
                          rescore_pending=rescore_pending, actors=actors, progress=progress)

    def list_patches(self, project_id: str, order: str = "score", status: str | None = None,
                     image_id: str | None = None, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        return self._call("list_patches", project_id=project_id, order=order, status=status, image_id=image_id,
                          limit=limit, offset=offset)

    def get_patch(self, project_id: str, patch_id: int) -> dict[str, Any]:
        """{image, predicted_labels, uncertainty, score, origin, shape, status, [labels]}."""
        return self._call("get_patch", project_id=project_id, patch_id=patch_id)

    def submit_labels(self, project_id: str, patch_id: int, labels: np.ndarray) -> dict[str, Any]:
        if isinstance(labels, np.ndarray) and labels.dtype.kind in "OUSVMm":
            # hypha-rpc would send an object array's pointers, and the service could not even decode the call
            raise BioadaptError(f"labels must be a numpy integer array, got dtype {labels.dtype}; cast them with "
                                "labels.astype(np.uint32)")
        return self._call("submit_labels", project_id=project_id, patch_id=patch_id, labels=labels)

    def skip_patch(self, project_id: str, patch_id: int) -> dict[str, Any]:
        return self._call("skip_patch", project_id=project_id, patch_id=patch_id)

    def fine_tune(self, project_id: str, epochs: int = 20, learning_rate: float = 1e-3, batch_size: int = 4,
                  base_version: int | None = None, params: dict[str, Any] | None = None,
                  progress: Callable[[dict], Any] | None = None) -> dict[str, Any]:
        """Start fine-tuning on the annotated patches; returns {job_id, patches, base_version}."""
        return self._call("fine_tune", project_id=project_id, epochs=epochs, learning_rate=learning_rate,
                          batch_size=batch_size, base_version=base_version, params=params, progress=progress)

    def job_status(self, job_id: str) -> dict[str, Any]:
        return self._call("job_status", job_id=job_id)

    def list_jobs(self, project_id: str | None = None) -> list[dict[str, Any]]:
        return self._call("list_jobs", project_id=project_id)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._call("cancel_job", job_id=job_id)

    def evaluate(self, project_id: str, versions: list[int] | None = None) -> dict[str, Any]:
        return self._call("evaluate", project_id=project_id, versions=versions)

    def predict(self, project_id: str, image_id: str, origin: list[int], shape: list[int],
                version: int | None = None, return_array: bool = False) -> dict[str, Any]:
        return self._call("predict", project_id=project_id, image_id=image_id, origin=list(origin),
                          shape=list(shape), version=version, return_array=return_array)

    def export_model(self, project_id: str, version: int | None = None, name: str | None = None,
                     description: str | None = None, authors: list[str] | None = None, license: str | None = None,
                     return_bytes: bool = False) -> dict[str, Any]:
        return self._call("export_model", project_id=project_id, version=version, name=name,
                          description=description, authors=authors, license=license, return_bytes=return_bytes)

    # -- helpers --------------------------------------------------------------------------------------
    def wait(self, job_id: str, progress: bool = True, poll_s: float = 0.5, timeout_s: float | None = None,
             raise_on_failure: bool = True) -> dict[str, Any]:
        """Poll a job until it finishes, with a tqdm bar (patches for scoring, epochs for fine-tuning)."""
        from tqdm.auto import tqdm

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        bar = None
        try:
            while True:
                job = self.job_status(job_id)
                done, total = _progress_counts(job)
                if progress and total:
                    if bar is None:
                        bar = tqdm(total=total, desc=f"{job['kind']} {job_id}",
                                   unit="patch" if job["kind"] == "score" else "epoch")
                    bar.n = min(done, total)
                    postfix = {k: job["progress"][k] for k in ("patches_per_second", "loss", "validation")
                               if isinstance(job["progress"].get(k), (int, float))}
                    bar.set_postfix(postfix, refresh=False)
                    bar.refresh()
                if job["state"] in FINISHED:
                    if bar is not None and job["state"] == "done":
                        bar.n = total
                        bar.refresh()
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise BioadaptError(f"job {job_id} still {job['state']} after {timeout_s} s")
                time.sleep(poll_s)
        finally:
            if bar is not None:
                bar.close()
        if raise_on_failure and job["state"] == "failed":
            raise BioadaptError(f"job {job_id} failed: {job['error']}")
        return job

    def disconnect(self) -> None:
        _quietly_disconnect(self.server)

    def __enter__(self) -> "BioadaptClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.disconnect()


def _quietly_disconnect(server: Any) -> None:
    rpc_log = logging.getLogger("RPC")
    level = rpc_log.level
    rpc_log.setLevel(logging.CRITICAL)  # hypha-rpc warns "Connection lost" on every deliberate disconnect
    try:
        server.disconnect()
    except Exception:
        pass
    finally:
        rpc_log.setLevel(level)


def _progress_counts(job: dict[str, Any]) -> tuple[int, int]:
    progress = job.get("progress") or {}
    if job["kind"] == "score":
        return int(progress.get("done", 0)), int(progress.get("total", 0))
    return int(progress.get("epoch", 0)), int(progress.get("epochs", 0))


def _message(error: Exception) -> str:
    """The service's own message out of a remote error (its last line names the exception)."""
    text = str(error)
    found = re.findall(r"^\w*(?:Error|Exception): ((?:AccessDenied|BioadaptError): .*(?:\n(?!\s*File ).*)*)$", text,
                       re.MULTILINE)
    if found:
        return found[-1].strip()
    return text.strip().splitlines()[-1] if text.strip() else type(error).__name__
