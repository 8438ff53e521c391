"""Where callers may point the service: local paths only inside the allowed roots (after resolving symlinks) and
never inside the service's own data folder (projects, labels, model versions, exports, logs, keys, database),
remote URLs by scheme; and error texts cleaned of the data folder's path before they leave the service."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from bioadapt.data.stores import local_path, scheme_of
from bioadapt.errors import BioadaptError

REMOTE_SCHEMES = ("http", "https", "s3")


DATA_FOLDER = "<data folder>"


class PathGuard:
    """``roots``: the folders of the users' data; ``private``: the service's own folder, refused even where a root
    contains it (``bioadapt demo`` allows the folder its data folder lies in)."""

    def __init__(self, roots: Sequence[str | Path], private: str | Path | None = None):
        self.roots = [Path(r).expanduser().resolve() for r in roots]
        self.private = Path(private).expanduser().resolve() if private is not None else None
        # longest first: the path as given may contain the resolved one or the other way round
        self._private_texts = sorted({str(Path(private).expanduser().absolute()), str(self.private)}, key=len,
                                     reverse=True) if private is not None else []

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
        if self.private is not None and resolved.is_relative_to(self.private):
            # the path is not echoed: it names another user's project folder
            raise BioadaptError(f"that {what} lies in the service's data folder, which holds every user's projects, "
                                "labels and models and which no call may read: give a path to your own data")
        if not any(resolved.is_relative_to(root) for root in self.roots):
            if not self.roots:
                raise BioadaptError(f"{what} {str(path)!r} is local, and this service reads no local folders: use "
                                    "http(s):// or s3://, or start the service with --allow-path for your data")
            allowed = ", ".join(str(r) for r in self.roots)
            raise BioadaptError(f"{what} {str(path)!r} is outside the folders this service may read ({allowed}); "
                                "move the data there or start the service with --allow-path for its folder")
        return resolved

    def redact(self, text: str) -> str:
        """An error text without the data folder's path (it names other users' project ids) and without excerpts
        of files (a log or key read as a model shows its lines in YAML errors and pydantic's input values)."""
        for private in self._private_texts:
            text = text.replace(private, DATA_FOLDER)
        return without_excerpts(text)

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


_CARET = re.compile(r"^\s*\^\s*(\(line: \d+\))?\s*$")  # PyYAML's marker, ruamel's with "(line: N)"
_INPUT_VALUE = re.compile(r"input_value=.*?, input_type=")


def without_excerpts(text: str) -> str:
    """``text`` without quoted file lines: a YAML parser's excerpt (the line above a '^' marker) and pydantic's
    ``input_value=...``."""
    lines = text.split("\n")
    kept = [line for i, line in enumerate(lines)
            if not _CARET.match(line) and not (i + 1 < len(lines) and _CARET.match(lines[i + 1]))]
    return _INPUT_VALUE.sub("input_type=", "\n".join(kept))
