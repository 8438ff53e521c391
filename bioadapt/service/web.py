"""The browser client (``web/`` in the repository, ``bioadapt/web`` in a wheel) served by the service itself, as
a public Hypha "functions" service: the page is at ``<server>/<workspace>/apps/bioadapt-web/`` whether the Hypha
server is the embedded one or another (``--server-url``). It serves static files only; every call the page makes goes through the
protected ``bioadapt`` service with the user's token.

Why "functions" and not an ASGI service: with hypha 0.21.137 / hypha-rpc 0.21.47 an ASGI app's ``send`` callback
into the server hung until the server's call timed out (20 s a request); a "functions" handler returns the whole
response as one value, ~5 ms a file.
"""

from __future__ import annotations

import importlib.resources
import logging
import mimetypes
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode

log = logging.getLogger(__name__)
WEB_SERVICE_ID = "bioadapt-web"


def web_dir() -> Path:
    """The page's folder: ``bioadapt/web`` in an installed wheel (package data mapped from ``web/`` by setup.py),
    else ``web/`` at the root of the checkout the package is imported from (an editable install, or PYTHONPATH)."""
    packaged = importlib.resources.files("bioadapt") / "web"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "web"


WEB_DIR = web_dir()
_TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".html": "text/html", ".css": "text/css",
          ".md": "text/markdown", ".png": "image/png", ".svg": "image/svg+xml", ".json": "application/json"}


def page_url(server_url: str, workspace: str) -> str:
    """The page's address with the server and workspace filled in (never the token: URLs end up in browser
    history and in the server's access log)."""
    query = urlencode({"server_url": server_url, "workspace": workspace})
    return f"{server_url.rstrip('/')}/{workspace}/apps/{WEB_SERVICE_ID}/?{query}"


def static_response(directory: str | Path, url_path: str) -> dict[str, Any]:
    """The response for ``url_path`` ("/" is index.html): a file under ``directory``, or 404 for anything else
    (including paths that lead out of it)."""
    root = Path(directory).resolve()
    relative = unquote(url_path).lstrip("/") or "index.html"
    target = (root / relative).resolve()
    if target.is_dir():
        target = target / "index.html"
    if not target.is_relative_to(root) or not target.is_file():
        return {"status": 404, "headers": {"content-type": "text/plain"}, "body": f"not found: {url_path}"}
    kind = _TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    if kind.startswith("text/") or kind == "application/json":
        kind += "; charset=utf-8"
    return {"status": 200, "headers": {"content-type": kind, "cache-control": "no-cache"},
            "body": target.read_bytes()}


def web_service(directory: str | Path = WEB_DIR) -> dict[str, Any]:
    """The service definition that serves ``directory``."""

    def serve_file(scope: dict[str, Any]) -> dict[str, Any]:
        if scope.get("method", "GET") not in ("GET", "HEAD"):
            return {"status": 405, "headers": {"content-type": "text/plain"}, "body": "GET only"}
        return static_response(directory, scope.get("function_path") or scope.get("path") or "/")

    return {"id": WEB_SERVICE_ID, "name": "bioadapt web page", "type": "functions", "default": serve_file,
            "description": "The bioadapt browser client (static files; the page calls the 'bioadapt' service).",
            "config": {"visibility": "public"}}


async def register_web_page(server: Any, server_url: str, directory: str | Path = WEB_DIR) -> str | None:
    """Register the page on ``server`` (a connected hypha-rpc client); its URL, or None (with a warning) when
    ``directory`` has no ``index.html``."""
    if not (Path(directory) / "index.html").is_file():
        log.warning("no web page to serve: %s has no index.html (install bioadapt from its wheel, or run it from a "
                    "checkout with web/ beside bioadapt/)", directory)
        return None
    await server.register_service(web_service(directory))
    return page_url(server_url, server.config.workspace)
