"""The Hypha face of ``BioadaptService``: one schema'd function per API call, validated with pydantic, run in a
thread pool (never on the event loop), with the caller taken from Hypha's context."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError

from bioadapt.errors import AccessDenied, BioadaptError
from bioadapt.service import schemas
from bioadapt.service.api import BioadaptService, Caller

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
    fields = list(schemas.FUNCTIONS[name].model_fields)
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


def _validation_message(name: str, error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "arguments"
        problems.append(f"{where}: {item['msg']}")
    return f"{name}: invalid arguments: " + "; ".join(problems)


def build_service(api: BioadaptService, *, public: bool = False, workers: int = 16) -> dict[str, Any]:
    """The service definition to pass to ``server.register_service``."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bioadapt-call")

    def make(name: str):
        method = getattr(api, name)
        model = schemas.FUNCTIONS[name]

        async def call(*args: Any, context: dict[str, Any] | None = None, **kwargs: Any) -> Any:
            running = asyncio.get_running_loop()
            try:
                caller = caller_of(context)
                values = _arguments(name, args, kwargs)
                progress = values.pop("progress", None) if name in schemas.JOB_FUNCTIONS else None
                try:
                    validated = model.model_validate(values)
                except ValidationError as e:
                    raise BioadaptError(_validation_message(name, e)) from None
                extra = {}
                if progress is not None:
                    extra["progress"] = _threadsafe(*_progress_callback(name, progress), running)
                return await running.run_in_executor(pool, lambda: method(caller, validated, **extra))
            except AccessDenied as e:
                raise PermissionError(f"AccessDenied: {e}") from None
            except BioadaptError as e:
                raise ValueError(f"BioadaptError: {e}") from None
            except Exception as e:  # unexpected: log it here, tell the caller what it was
                log.exception("%s failed", name)
                raise RuntimeError(f"{type(e).__name__}: {e}") from None

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
