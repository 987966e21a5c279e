"""Giving freed heap memory back to the OS before a step's largest allocations (CPU, glibc).

glibc serves tensors below its mmap threshold (which rises to 32 MB once a chunk that large is
freed) from its heap, and keeps freed chunks inside the heap resident: after a training step's
forward and backward, 100-500 MB of free but resident heap sat under the next step's peak
(benchmarks/probe_train_step_memory.py). `malloc_trim(0)` hands those pages back (madvise); the
price is the page faults when they are reused.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from common.memory import active_allocator


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    if active_allocator() != "glibc":     # jemalloc (common/memory.py) keeps its own free pages in check
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):     # not glibc (musl, macOS): nothing to do
        return None


def release_free_heap(device: torch.device | str) -> None:
    """On CPU under glibc, return the heap's free pages to the OS; elsewhere a no-op."""
    trim = _malloc_trim() if torch.device(device).type == "cpu" else None
    if trim is not None:
        trim(0)
