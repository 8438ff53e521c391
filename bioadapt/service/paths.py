"""Where callers may point the service: local paths only inside the allowed roots (after resolving symlinks),
remote URLs by scheme."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from bioadapt.data.stores import local_path, scheme_of
from bioadapt.errors import BioadaptError

REMOTE_SCHEMES = ("http", "https", "s3")


class PathGuard:
    def __init__(self, roots: Sequence[str | Path]):
        self.roots = [Path(r).expanduser().resolve() for r in roots]

    def local(self, path: str | Path, what: str = "path") -> Path:
        """``path`` resolved, when it lies inside an allowed root; '..' parts and symlinks leading out are refused."""
        given = Path(str(path)).expanduser()
        if ".." in given.parts:
            raise BioadaptError(f"{what} {str(path)!r} contains '..': give the absolute path inside an allowed "
                                "folder")
        if not given.is_absolute():
            raise BioadaptError(f"{what} {str(path)!r} is relative: the service cannot know what it is relative "
                                "to; give an absolute path")
        resolved = given.resolve()
        if not any(resolved == root or resolved.is_relative_to(root) for root in self.roots):
            allowed = ", ".join(str(r) for r in self.roots)
            raise BioadaptError(f"{what} {str(path)!r} is outside the folders this service may read ({allowed}); "
                                "move the data there or start the service with --allow-path for its folder")
        return resolved

    def uri(self, uri: str, what: str = "image") -> str:
        """A URI the service may open: a confined local path (returned resolved), or http(s):// / s3://."""
        if not isinstance(uri, str) or not uri.strip():
            raise BioadaptError(f"{what} URI must be a non-empty string")
        scheme = scheme_of(uri)
        if scheme == "":
            return str(self.local(local_path(uri) if uri.startswith("file://") else uri, f"{what} path"))
        if scheme not in REMOTE_SCHEMES:
            raise BioadaptError(f"{what} URI {uri!r} has scheme {scheme!r}; use a local path, file://, http(s):// "
                                "or s3://")
        return uri

    def model_source(self, source: str) -> str:
        """A model source: a zoo id or URL as is, 'cellpose:<builtin>' as is, local files confined."""
        if not isinstance(source, str) or not source.strip():
            raise BioadaptError("model source must be a non-empty string")
        if source.startswith("cellpose:"):
            rest = source.removeprefix("cellpose:")
            if "/" in rest or rest.startswith("~") or Path(rest).suffix:
                return "cellpose:" + str(self.local(rest, "Cellpose weights path"))
            return source
        if scheme_of(source) in REMOTE_SCHEMES:
            return source
        if ("/" not in source and not Path(source).suffix) or re.match(r"^10\.\d+/", source):
            return source  # a bioimage.io zoo id ("affable-shark") or DOI: resolved by the adapters
        return str(self.local(local_path(source) if source.startswith("file://") else source, "model path"))
