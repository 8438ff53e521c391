"""Turn an image URI into a Zarr store: local paths, file://, http(s):// (read-only), s3://."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import zarr
from zarr.storage import FsspecStore, LocalStore

from bioadapt.data.tiff import CONVERT_HINT, SUPPORTED
from bioadapt.errors import BioadaptError

REMOTE_SCHEMES = ("http", "https", "s3")
READ_ONLY_SCHEMES = ("http", "https")


def scheme_of(uri: str | Path) -> str:
    """'' for local paths (with or without file://), else the URL scheme."""
    uri = str(uri)
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("", "file") or len(scheme) == 1:  # len 1: a Windows drive letter
        return ""
    return scheme


def local_path(uri: str | Path) -> Path | None:
    """The file-system path of a local URI, None for a remote one."""
    uri = str(uri)
    if scheme_of(uri):
        return None
    if uri.startswith("file://"):
        uri = urlparse(uri).path
    return Path(uri).expanduser().absolute()


def join_uri(uri: str | Path, *parts: str) -> str:
    """Append path parts to a local path or a URL."""
    base = str(uri).rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts if p]])


def open_store(uri: str | Path, *, read_only: bool = True,
               storage_options: dict[str, Any] | None = None) -> zarr.abc.store.Store:
    """A Zarr store for ``uri``. Remote stores go through fsspec."""
    scheme = scheme_of(uri)
    if not scheme:
        path = local_path(uri)
        if read_only and not path.exists():
            raise BioadaptError(f"no image at '{path}': the path does not exist; check the path or URI")
        return LocalStore(path, read_only=read_only)
    if scheme not in REMOTE_SCHEMES:
        raise BioadaptError(
            f"unsupported URI scheme '{scheme}://' in '{uri}': use a local path, file://, http(s):// or s3://"
        )
    if scheme in READ_ONLY_SCHEMES and not read_only:
        raise BioadaptError(f"'{uri}' is served over {scheme}, which is read-only: write to a local path or s3:// instead")
    try:
        return FsspecStore.from_url(str(uri).rstrip("/"), storage_options=storage_options or {}, read_only=read_only)
    except ImportError as err:
        raise BioadaptError(f"reading {scheme}:// URIs needs an fsspec backend ({err}); install bioadapt with its dependencies") from err


def open_node(uri: str | Path, *, storage_options: dict[str, Any] | None = None,
              read_only: bool = True) -> zarr.Array | zarr.Group:
    """Open the Zarr array or group at ``uri`` (Zarr format 2 or 3, detected)."""
    store = open_store(uri, read_only=read_only, storage_options=storage_options)
    try:
        return zarr.open(store=store, mode="r" if read_only else "r+")
    except (FileNotFoundError, KeyError) as err:
        raise BioadaptError(f"no Zarr array or group at '{uri}' ({type(err).__name__}: {err}); check the URI. "
                            f"bioadapt opens {SUPPORTED}; {CONVERT_HINT}") from err
    except OSError as err:
        raise BioadaptError(f"could not read '{uri}': {err}") from err
