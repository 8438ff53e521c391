"""A file lock shared by processes that write one Zarr store (Ray actors, the service): chunks shared by two
windows stay consistent when several writers touch them."""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_FILE = "bioadapt.lock"


@contextmanager
def store_lock(folder: str | Path, *, exclusive: bool) -> Iterator[None]:
    """Hold the lock of the store in ``folder``: exclusive to write, shared to read."""
    with open(Path(folder) / LOCK_FILE, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
