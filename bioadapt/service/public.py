"""What callers see of the service's records. Answers hold names, ids, version numbers and sizes, never a path the
service made (a project's folder, a version's weights, its stores, an export's package, a job's output file): a
caller may be on another machine, and a shared server's file system is none of its users' business. A file a job
made is fetched by its name with ``job_output``. Sources and URIs the caller gave (a model's source, an image's URI)
are answered as given; clients show the model's name."""

from __future__ import annotations

from typing import Any

SERVER_PATH_KEYS = ("path", "folder")  # keys of records and job results that hold a path the service made


def model_name(info: dict[str, Any], source: str) -> str:
    """A model's name to show: the one its description gives, else the last part of its source."""
    return str(info.get("name") or source.rstrip("/").rsplit("/", 1)[-1] or source)


def public_model(model: dict[str, Any]) -> dict[str, Any]:
    return {"id": model["id"], "name": model_name(model["info"], model["source"]), "source": model["source"],
            "options": model["options"], "info": model["info"], "created": model["created"]}


def public_image(row: dict[str, Any]) -> dict[str, Any]:
    """An image as callers see it: never its stores' paths nor its storage options (they may hold credentials)."""
    return {k: row[k] for k in ("id", "uri", "axes", "channels", "mask", "shape", "spatial_axes", "created")}


def public_version(version: dict[str, Any]) -> dict[str, Any]:
    """A model version without the path of its weights."""
    return {k: v for k, v in version.items() if k not in SERVER_PATH_KEYS}


def public_result(result: Any) -> Any:
    """A job's result without server paths; its ``outputs`` (name -> file) become the names ``job_output`` takes."""
    if not isinstance(result, dict):
        return result
    shown = {k: v for k, v in result.items() if k not in (*SERVER_PATH_KEYS, "outputs")}
    if "outputs" in result:
        shown["outputs"] = sorted(result["outputs"])
    return shown
