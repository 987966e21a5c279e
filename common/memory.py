"""Process-wide allocator settings for processes that move large tensors (servers, trainers).

glibc serves allocations above its mmap threshold (dynamic, from 128 KiB) with fresh mmap'd
pages and returns freed heap tops to the OS early, so every multi-MiB feature batch page-faults
its way in again: on the 2-core test machine that made a 4 MiB tensor copy ~7x slower than
writing into reused memory (see benchmarks/README.md). Raising both thresholds keeps such
buffers in the heap for reuse. Call once at process start; a no-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20   # glibc's maximum on 64-bit: buffers up to 32 MiB come from the heap
TRIM_THRESHOLD = 1 << 30    # keep up to 1 GiB of freed heap for reuse instead of unmapping it


def tune_malloc() -> bool:
    """Apply the thresholds above; True if glibc accepted them."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc thresholds: mmap %d, trim %d (%s)", MMAP_THRESHOLD, TRIM_THRESHOLD, "ok" if ok else "refused")
    return ok
