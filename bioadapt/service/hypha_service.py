"""The Hypha face of ``BioadaptService``: one schema'd function per API call, validated with pydantic, run in a
thread pool (never on the event loop), with the caller taken from Hypha's context.

Fairness: calls that can take long (opening images, loading models, sampling, Ray tasks) run in their own pool,
so they never hold the threads quick calls (lists, status, labels) run in; each user gets a limited number of
calls at once (``limits.CallGate``), the rest wait their turn without holding a thread. Errors leave without the
data folder's path."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError

from bioadapt.errors import AccessDenied, BioadaptError
from bioadapt.service import schemas
from bioadapt.service.api import BioadaptService, Caller
from bioadapt.service.limits import CallGate, Limits

log = logging.getLogger(__name__)
SERVICE_ID = "bioadapt"


def caller_of(context: dict[str, Any] | None) -> Caller:
    user = (context or {}).get("user") or {}
    if not user.get("id"):
        raise AccessDenied("the call carries no user: register the service with require_context")
    return Caller(id=str(user["id"]), anonymous=bool(user.get("is_anonymous")) or "anonymous" in user.get("roles", []))


def _arguments(name: str, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments from a call: keywords (Python), one object (ImJoy / JavaScript) or positional values."""
    if args and len(args) == 1 and isinstance(args[0], dict) and not kwargs:
        return dict(args[0])
    fields = list(schemas.FUNCTIONS[name].args.model_fields)
    if name in schemas.JOB_FUNCTIONS:
        fields.append("progress")
    if len(args) > len(fields):
        raise BioadaptError(f"{name} takes at most {len(fields)} positional arguments ({', '.join(fields)}), "
                            f"got {len(args)}")
    values = dict(zip(fields, args))
    duplicated = set(values) & set(kwargs)
    if duplicated:
        raise BioadaptError(f"{name} got {sorted(duplicated)} both by position and by name")
    return {**values, **kwargs}


class CallPools:
    """The threads calls run in: one pool for quick calls, one for slow ones; ``close`` lets the calls in flight
    finish (for a while) when the service stops."""

    def __init__(self, quick: int = 16, slow: int = 16):
        self.quick = ThreadPoolExecutor(max_workers=quick, thread_name_prefix="bioadapt-call")
        self.slow = ThreadPoolExecutor(max_workers=slow, thread_name_prefix="bioadapt-slow-call")
        self._busy = 0
        self._idle = threading.Condition()

    async def run(self, slow: bool, function: Callable[[], Any]) -> Any:
        with self._idle:
            self._busy += 1
        try:
            future = (self.slow if slow else self.quick).submit(function)
        except RuntimeError:  # the pools were closed: the service is stopping
            self._done(None)
            raise BioadaptError("the service is stopping; call again once it is back") from None
        future.add_done_callback(self._done)  # run to its end, or cancelled by close() before it started
        return await asyncio.wrap_future(future)

    def _done(self, _future: Any) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def close(self, timeout_s: float) -> bool:
        """Take no more calls; True once the calls in flight ended, False after ``timeout_s``."""
        for pool in (self.quick, self.slow):
            pool.shutdown(wait=False, cancel_futures=True)
        with self._idle:
            return self._idle.wait_for(lambda: self._busy <= 0, timeout_s)


def build_service(api: BioadaptService, *, public: bool = False, pools: CallPools | None = None,
                  limits: Limits | None = None) -> dict[str, Any]:
    """The service definition to pass to ``server.register_service``."""
    pools = pools or CallPools()
    gate = CallGate(limits or api.limits)

    def make(name: str):
        method = getattr(api, name)
        model = schemas.FUNCTIONS[name].args
        slow = name in schemas.SLOW_FUNCTIONS

        async def call(*args: Any, context: dict[str, Any] | None = None, **kwargs: Any) -> Any:
            running = asyncio.get_running_loop()
            try:
                caller = caller_of(context)
                values = _arguments(name, args, kwargs)
                progress = values.pop("progress", None) if name in schemas.JOB_FUNCTIONS else None
                try:
                    validated = model.model_validate(values)
                except ValidationError as e:
                    raise BioadaptError(schemas.validation_message(name, e)) from None
                extra = {}
                if progress is not None:
                    extra["progress"] = _threadsafe(*_progress_callback(name, progress), running)
                async with gate.turn(caller.id, slow):
                    return await pools.run(slow, lambda: method(caller, validated, **extra))
            except AccessDenied as e:
                raise PermissionError(f"AccessDenied: {api.guard.redact(str(e))}") from None
            except BioadaptError as e:
                raise ValueError(f"BioadaptError: {api.guard.redact(str(e))}") from None
            except Exception as e:  # unexpected: logged here in full; the caller gets what it was, without paths
                log.exception("%s failed", name)
                raise RuntimeError(f"{name} failed inside the service ({type(e).__name__}: "
                                   f"{api.guard.redact(str(e))[:500]}); its log has the details") from None

        call.__name__ = name
        call.__doc__ = model.__doc__
        call.__schema__ = schemas.function_schema(name)
        return call

    service: dict[str, Any] = {
        "id": SERVICE_ID, "name": "bioadapt",
        "description": "Adapt bioimage.io and Cellpose models to your images: MC-dropout BALD patch scoring, "
                       "corrections, fine-tuning on Ray, bioimage.io export.",
        "config": {"visibility": "public" if public else "protected", "require_context": True},
    }
    for name in schemas.FUNCTIONS:
        service[name] = make(name)
    return service


def _progress_callback(name: str, progress: Any) -> tuple[Any, Any]:
    """(callback, dispose) from a ``progress`` argument. hypha-rpc drops a function passed as an argument when
    the call returns, and score / fine_tune return at once with a job id: a callback that outlives the call must
    come inside an object marked ``_rintf`` (``{"_rintf": True, "on_progress": f}``, what the Python client
    sends); its ``_dispose`` is called when the job ends. A bare function only sees events sent before the call
    returns."""
    if callable(progress):
        return progress, None
    member = _member(progress, "on_progress")
    if callable(member):
        return member, _member(progress, "_dispose")
    raise BioadaptError(f"{name}: progress must be a function, or an object with an on_progress function (with "
                        "_rintf set, so that it outlives the call)")


def _member(value: Any, key: str) -> Any:
    try:
        return value[key]
    except Exception:
        return getattr(value, key, None)


def _threadsafe(callback: Any, dispose: Any, loop: asyncio.AbstractEventLoop):
    """A job thread's progress reports, sent to the caller's callback from the service's event loop (fire and
    forget: a slow or vanished caller never holds a job up); the caller's callback is released after the job's
    last report."""

    def run(function: Any, *args: Any) -> None:
        try:
            result = function(*args)
        except Exception:  # a caller that went away
            return
        if asyncio.iscoroutine(result) or asyncio.isfuture(result):
            task = asyncio.ensure_future(result)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def send(info: dict[str, Any]) -> None:
        def fire() -> None:
            run(callback, info)
            if callable(dispose) and info.get("state") in ("done", "failed", "cancelled"):
                run(dispose)

        loop.call_soon_threadsafe(fire)

    return send
