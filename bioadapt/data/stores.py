"""Turn an image URI into a Zarr store: local paths, file://, http(s):// (read-only), s3://; remote stores with
connect and read timeouts, and read failures explained (a timeout, a refused connection, undecodable chunks)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import zarr
from zarr.storage import FsspecStore, LocalStore

from bioadapt.data.tiff import CONVERT_HINT, SUPPORTED
from bioadapt.errors import BioadaptError

REMOTE_SCHEMES = ("http", "https", "s3")
READ_ONLY_SCHEMES = ("http", "https")
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
TIMEOUT_VARIABLE = "BIOADAPT_REMOTE_TIMEOUT_S"


def remote_timeouts() -> tuple[float, float]:
    """(connect, read) seconds for remote stores: $BIOADAPT_REMOTE_TIMEOUT_S (the read timeout; connecting gets
    at most as long) when set, else 10 s and 30 s. A server that accepts and never answers fails after these."""
    try:
        read = float(os.environ.get(TIMEOUT_VARIABLE, READ_TIMEOUT_S))
    except ValueError:
        read = READ_TIMEOUT_S
    read = read if read > 0 else READ_TIMEOUT_S
    return min(CONNECT_TIMEOUT_S, read), read


def with_timeouts(scheme: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """fsspec options with connect and read timeouts added (those already given win). aiohttp's default is one
    300 s limit for the whole request; s3fs's are 5 s / 15 s, retried."""
    import aiohttp

    options = dict(storage_options or {})
    connect, read = remote_timeouts()
    if scheme in ("http", "https"):
        client = dict(options.get("client_kwargs") or {})
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read))
        options["client_kwargs"] = client
    elif scheme == "s3":
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", connect)
        config.setdefault("read_timeout", read)
        options["config_kwargs"] = config
    return options


def read_failure(uri: str | Path, error: BaseException, what: str = "its data") -> BioadaptError:
    """A user's explanation of a failed read of ``uri``: no answer in time, no connection, or data that does not
    decode (a damaged chunk, a compressor that does not match)."""
    import aiohttp

    causes = []
    cause: BaseException | None = error
    while cause is not None and len(causes) < 10:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if any(isinstance(c, TimeoutError) for c in causes):  # asyncio's and aiohttp's timeouts are TimeoutErrors
        return BioadaptError(f"could not read '{uri}': the server did not answer within {remote_timeouts()[1]:g} s "
                             f"(reading {what}); check that it serves the data (or set {TIMEOUT_VARIABLE} higher)")
    if any(isinstance(c, (aiohttp.ClientConnectionError, ConnectionError)) for c in causes):
        return BioadaptError(f"could not read '{uri}': cannot connect to its server ({detail}); check the address "
                             "and that the server runs")
    if scheme_of(uri) and any(isinstance(c, (aiohttp.ClientError, OSError)) for c in causes):
        return BioadaptError(f"could not read '{uri}' ({what}): {detail}")
    return BioadaptError(f"'{uri}': {what} cannot be decoded ({detail}); its chunk files are damaged or do not "
                         "match its metadata: write the image again")


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


def check_reachable(url: str) -> None:
    """Raise a BioadaptError saying why the server of an http(s) ``url`` cannot be reached (refused, no answer
    within the connect timeout, unknown host); any HTTP answer, an error status included, counts as reached."""
    import urllib.error
    import urllib.request

    connect, _ = remote_timeouts()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=connect):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, TimeoutError) or isinstance(err, TimeoutError):
            raise BioadaptError(f"could not reach '{url}': its server did not answer within {connect:g} s; check "
                                "the address and that the server runs") from err
        raise BioadaptError(f"could not reach '{url}': {reason}; check the address and that the server runs") from err


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
        return FsspecStore.from_url(str(uri).rstrip("/"), storage_options=with_timeouts(scheme, storage_options),
                                    read_only=read_only)
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
        raise read_failure(uri, err, "its metadata") from err
