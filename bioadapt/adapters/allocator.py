"""Keep glibc from handing large freed buffers back to the OS between forward passes.

Batched MC passes allocate and free activation buffers of hundreds of MB per call. By default glibc serves
them with mmap and unmaps them on free, so every call faults the pages in again: batched scoring measured 2-3x
slower per patch than one pass at a time here (benchmarks/bench_scoring.py). Raising the mmap and trim
thresholds keeps the memory in the heap for reuse, at the cost of a higher resident peak. Set
BIOADAPT_TUNE_MALLOC=0 to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
_tuned: bool | None = None


def tune_malloc() -> bool:
    """Raise glibc's mmap/trim thresholds once per process; True when they are set (Linux with glibc)."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if not sys.platform.startswith("linux") or os.environ.get("BIOADAPT_TUNE_MALLOC", "1") == "0":
        return _tuned
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return _tuned
    _tuned = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, (1 << 31) - 1), (M_TOP_PAD, 1 << 28)))
    log.debug("glibc malloc thresholds raised: %s", _tuned)
    return _tuned
