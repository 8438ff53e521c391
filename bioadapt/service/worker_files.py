"""Temporary files of the Ray worker processes that load models.

bioimageio.core imports a model's Python architecture from a file it writes into a ``TemporaryDirectory`` that it
keeps until the interpreter exits, and a package sent as bytes is unpacked into one too. Ray stops actors with
``ray.kill``, which ends the process before any of that cleanup runs, so every model actor used to leave a
``/tmp/tmpXXXXXXXX/`` behind (71 after one test run). Each worker therefore writes its temporary files into a folder
named after its process id, and whoever starts the next worker on that machine, or stops the service, removes the
folders of processes that are gone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

PREFIX = "bioadapt-worker-"


def use_own_temporary_folder() -> Path:
    """Point this process's ``tempfile`` at a folder of its own (made once per process), after removing the
    folders left by worker processes that no longer run."""
    current = Path(tempfile.gettempdir())
    if _owner(current) == os.getpid():
        return current
    root = current.parent if _owner(current) is not None else current  # a forked child: its parent's root
    remove_orphans(root)
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
    tempfile.tempdir = str(folder)
    return folder


def remove_orphans(root: str | Path | None = None, wait_s: float = 0.0) -> int:
    """Remove the worker folders in ``root`` (default: the system's temporary folder) whose process has ended;
    with ``wait_s``, keep trying that long for processes that are still ending (Ray stops its workers a moment
    after it shuts down). Returns how many folders went."""
    root = Path(root or tempfile.gettempdir())
    deadline = time.monotonic() + wait_s
    removed = 0
    while True:
        left = []
        for folder in root.glob(f"{PREFIX}*"):
            pid = _owner(folder)
            if pid is None or not folder.is_dir():
                continue
            if _running(pid):
                left.append(folder)
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed += not folder.exists()
        if not left or time.monotonic() >= deadline:
            return removed
        time.sleep(0.2)


def _owner(folder: Path) -> int | None:
    """The process id in a worker folder's name, else None."""
    if not folder.name.startswith(PREFIX):
        return None
    pid = folder.name[len(PREFIX):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
