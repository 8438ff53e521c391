"""The Python client: ``connect(server_url, token, workspace)`` gives the service's functions as methods made from
the service's schemas (same names, parameters and defaults; only the arguments the caller gives are sent, so the
service's, or the adapter's, defaults apply to the rest), ``wait(job)`` with a progress bar for every job,
errors as BioadaptError / AccessDenied, a fresh service handle when the old one expired (the service restarted),
and a fresh connection when the websocket is gone or hypha-rpc reconnected it by itself (the embedded Hypha server
restarted with the service)."""

from __future__ import annotations

import inspect
import logging
import re
import time
from collections.abc import Callable
from typing import Any, get_args

from bioadapt.errors import AccessDenied, BioadaptError
from bioadapt.service import schemas

SERVICE_ID = "bioadapt"
ACQUISITIONS: tuple[str, ...] = get_args(schemas.Acquisition)  # what score(acquisition=...) takes
STRATEGIES: tuple[str, ...] = get_args(schemas.StrategyName)  # what score(strategy=...) takes
DEFAULT_RANDOM_PATCHES = schemas.DEFAULT_RANDOM_PATCHES  # what score draws in random mode without n_patches
FINISHED = ("done", "failed", "cancelled")
_UNITS = {"score": "patch", "fine_tune": "epoch", "evaluate": "patch", "predict": "tile"}
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
        self._stale = False
        self._watch(server)
        self._service = self._fetch()

    def _watch(self, server: Any) -> None:
        """hypha-rpc reconnects a dropped websocket by itself, but after a server restart that connection is of no
        use: the service came back under a new client id, the new server drops calls to the old one without an
        answer (a timeout after ``method_timeout``, not an error), and with a token that may not register the
        client's own service in the workspace even ``get_service`` times out. A reconnection therefore makes
        the next call open a new connection."""
        if callable(on := getattr(server, "on", None)):
            on("connected", self._mark_stale)

    def _mark_stale(self, _connection_info: Any = None) -> None:
        self._stale = True

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
                self._watch(self.server)
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
        for name, value in kwargs.items():
            if getattr(getattr(value, "dtype", None), "kind", "") in ("O", "U", "S", "V", "M", "m"):
                # hypha-rpc would send an object array's pointers, and the service could not even decode the call
                raise BioadaptError(f"{function}: {name} must be a numpy integer array, got dtype {value.dtype}; "
                                    f"cast it with {name}.astype(np.uint32)")
        if callable(kwargs.get("progress")):
            # hypha-rpc drops a plain function argument when the call returns (score / fine_tune return a job id
            # at once); one inside an object marked _rintf stays callable until the service disposes of it
            kwargs["progress"] = {"_rintf": True, "on_progress": kwargs["progress"]}
        for attempt in range(3):
            if self._stale:
                self._stale = False
                self._reconnect("the server restarted")
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

    # -- helpers --------------------------------------------------------------------------------------
    def wait(self, job: str | dict[str, Any], progress: bool = True, poll_s: float = 0.5,
             timeout_s: float | None = None, raise_on_failure: bool = True) -> dict[str, Any]:
        """Poll a job (its id, what score / fine_tune / evaluate / predict / export_model answered, or its
        record) until it finishes, with a tqdm bar; returns the job record, its ``result`` included."""
        from tqdm.auto import tqdm

        job_id = (job.get("job_id") or job["id"]) if isinstance(job, dict) else job
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        bar = None
        try:
            while True:
                job = self.job_status(job_id)
                done, total = _progress_counts(job)
                if progress and total:
                    if bar is None:
                        bar = tqdm(total=total, desc=f"{job['kind']} {job_id}", unit=_UNITS.get(job["kind"], "step"))
                    bar.n = min(done, total)
                    postfix = {k: job["progress"][k] for k in ("patches_per_second", "loss", "validation")
                               if isinstance(job["progress"].get(k), (int, float))}
                    if str(job["progress"].get("phase", "")).startswith("cross-validating"):  # the bar restarts
                        postfix["phase"] = job["progress"]["phase"]
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
    if job["kind"] == "fine_tune":
        return int(progress.get("epoch", 0)), int(progress.get("epochs", 0))
    return int(progress.get("done", 0)), int(progress.get("total", 0))


def defaults(function: str) -> dict[str, Any]:
    """The defaults the service applies to ``function``'s parameters a caller leaves out (None: decided later,
    e.g. by the model's adapter)."""
    return {name: field.get_default(call_default_factory=True)
            for name, field in schemas.FUNCTIONS[function].args.model_fields.items() if not field.is_required()}


def _signature(function: str) -> inspect.Signature:
    """The method's signature from the function's schema: required parameters first, in schema order."""
    fields = schemas.FUNCTIONS[function].args.model_fields
    required = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=field.annotation)
                for name, field in fields.items() if field.is_required()]
    optional = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=field.annotation,
                                  default=field.get_default(call_default_factory=True))
                for name, field in fields.items() if not field.is_required()]
    if function in schemas.JOB_FUNCTIONS:
        optional.append(inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=None,
                                          annotation=Callable[[dict], Any] | None))
    self = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return inspect.Signature([self, *required, *optional], return_annotation=Any)


def _doc(function: str) -> str:
    model = schemas.FUNCTIONS[function].args
    lines = [inspect.cleandoc(model.__doc__ or function), ""]
    for name, field in model.model_fields.items():
        shown = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        lines.append(f"{name} ({shown}){': ' + field.description if field.description else ''}")
    if function in schemas.JOB_FUNCTIONS:
        lines += ["progress: optional callback receiving the job's progress dicts", "",
                  "Returns {job_id, ...} at once: svc.wait(answer) follows the job and returns it with its result."]
    return "\n".join(lines)


def _method(function: str) -> Callable[..., Any]:
    signature = _signature(function)

    def call(self: "BioadaptClient", *args: Any, **kwargs: Any) -> Any:
        given = signature.bind(self, *args, **kwargs).arguments  # only what the caller gave: no defaults added
        given.pop("self")
        return self._call(function, **given)

    call.__name__ = call.__qualname__ = function
    call.__signature__ = signature
    call.__doc__ = _doc(function)
    return call


for _function in schemas.FUNCTIONS:
    setattr(BioadaptClient, _function, _method(_function))


def _message(error: Exception) -> str:
    """The service's own message out of a remote error (its last line names the exception)."""
    text = str(error)
    found = re.findall(r"^\w*(?:Error|Exception): ((?:AccessDenied|BioadaptError): .*(?:\n(?!\s*File ).*)*)$", text,
                       re.MULTILINE)
    if found:
        return found[-1].strip()
    return text.strip().splitlines()[-1] if text.strip() else type(error).__name__
