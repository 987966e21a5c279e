"""Process-wide allocator choice and settings for processes that move large tensors (trainers, servers).

Two jobs, one owner:
- `prefer_jemalloc()`: a CLI entry calls it first thing. Under glibc a training step's heap grows its page
  faults over a run (92k -> 119k minor faults per step over 372 parity steps, docs/notes/issue-20.md); jemalloc
  keeps them flat and trains the demo's recipe at 1.41x the tokens per CPU-second, identical losses, lower peak RSS
  (benchmarks/bench_allocator.py; the parity step alone: 1.19-1.21x, benchmarks/probe_parity_allocator.py). An allocator has to be in place before
  the process's first malloc, so when the system has libjemalloc the entry re-executes the same command with it in
  `LD_PRELOAD` (os.execve: same PID, same pipes; child processes inherit it). `SPECRELAY_MALLOC` chooses:
  `auto` (default: jemalloc when found), `jemalloc` (required: an error if missing), `glibc` (never re-execute).
- `tune_malloc()` (glibc only): glibc serves allocations above its mmap threshold (dynamic, from 128 KiB) with
  fresh mmap'd pages and returns freed heap tops to the OS early, so every multi-MiB feature batch page-faults its
  way in again: on the 2-core test machine that made a 4 MiB tensor copy ~7x slower than writing into reused
  memory (see benchmarks/README.md). Raising both thresholds keeps such buffers in the heap for reuse.
- `keep_large_pages()` (jemalloc only, at run time; the trainer calls it): a training step frees and re-allocates
  the same large buffers every step (activations, logits; DFlash's are hundreds of MiB). jemalloc serves
  allocations over 8 MiB from a dedicated arena that returns freed pages to the system at once, so every step
  faults them back in: DFlash trained at 0.76x glibc's speed (1.9M minor faults per step), EAGLE-3's demo recipe
  paid 29k faults per step. Keeping that arena's pages removes most of it (docs/notes/issue-20.md, "Session 16").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "SPECRELAY_MALLOC"
CHOICES = ("auto", "jemalloc", "glibc")
_REEXEC_PID = "_SPECRELAY_MALLOC_REEXEC"     # set to our PID before re-executing: never loop on a failed preload
_JEMALLOC_SONAME = "libjemalloc.so.2"
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
INSTALL_HINT = "install it (Debian/Ubuntu: apt-get install libjemalloc2; Fedora: dnf install jemalloc)"

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20   # glibc's maximum on 64-bit: buffers up to 32 MiB come from the heap
TRIM_THRESHOLD = 1 << 30    # keep up to 1 GiB of freed heap for reuse instead of unmapping it


def malloc_choice() -> str:
    """`SPECRELAY_MALLOC`, validated (`auto` when unset)."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise SystemExit(f"{ENV}={os.environ[ENV]!r} is not an allocator choice: use one of {', '.join(CHOICES)} "
                         "(auto: jemalloc when the system has it)")
    return choice


def find_jemalloc() -> str | None:
    """The path of the system's libjemalloc.so.2, or None."""
    for d in _LIB_DIRS:
        p = Path(d) / _JEMALLOC_SONAME
        if p.is_file():
            return str(p)
    name = ctypes.util.find_library("jemalloc")   # ldconfig's cache: other layouts
    return name if name and name.startswith("libjemalloc.so") else None


@functools.lru_cache(maxsize=None)
def active_allocator() -> str:
    """The malloc this process runs on: "jemalloc" (mapped into it), "glibc", or "other" (not Linux/glibc)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "other"
    if "libjemalloc" in maps:
        return "jemalloc"
    return "glibc" if "libc.so.6" in maps or "libc-2." in maps else "other"


def prefer_jemalloc() -> None:
    """At a CLI's start: re-execute this command under jemalloc when `SPECRELAY_MALLOC` allows and the system has it.

    Returns (nothing changed) under `glibc`, when jemalloc is already in place, off Linux, or when libjemalloc is
    absent under `auto`; raises SystemExit under `jemalloc` when it is absent. Does not return when it re-executes.
    """
    choice = malloc_choice()
    if choice == "glibc" or not sys.platform.startswith("linux") or active_allocator() == "jemalloc":
        return
    if os.environ.get(_REEXEC_PID) == str(os.getpid()):   # we re-executed and the preload did not take
        log.warning("LD_PRELOAD=%s did not load jemalloc; running on %s", os.environ.get("LD_PRELOAD"),
                    active_allocator())
        return
    lib = find_jemalloc()
    if lib is None:
        if choice == "jemalloc":
            raise SystemExit(f"{ENV}=jemalloc but {_JEMALLOC_SONAME} was not found: {INSTALL_HINT}, "
                             f"or set {ENV}=auto to run on glibc")
        return
    env = _preload(dict(os.environ), lib)
    env[_REEXEC_PID] = str(os.getpid())
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def _preload(env: dict[str, str], lib: str | None) -> dict[str, str]:
    """env with jemalloc first in LD_PRELOAD (lib), or with every jemalloc taken out of it (None)."""
    rest = [p for p in env.get("LD_PRELOAD", "").split(":") if p and "libjemalloc" not in p]
    env["LD_PRELOAD"] = ":".join([lib, *rest] if lib else rest)
    if not env["LD_PRELOAD"]:
        del env["LD_PRELOAD"]
    return env


def allocator_env(choice: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default: this process's) that starts any child process on the malloc `choice` (CHOICES):
    for programs that do not call `prefer_jemalloc` themselves, e.g. a peer's trainer in a benchmark. `auto` is
    jemalloc when the system has it; `jemalloc` without the library is an error saying what to install."""
    if choice not in CHOICES:
        raise SystemExit(f"allocator {choice!r}: use one of {', '.join(CHOICES)}")
    lib = find_jemalloc() if choice != "glibc" else None
    if choice == "jemalloc" and lib is None:
        raise SystemExit(f"jemalloc asked for but {_JEMALLOC_SONAME} was not found: {INSTALL_HINT}")
    out = _preload(dict(os.environ if env is None else env), lib)
    out[ENV] = "jemalloc" if lib else "glibc"    # a SpecRelay command in there then keeps the same choice
    return out


def describe_allocator() -> str:
    """One line for logs and reports: the malloc this process runs on, and why when it is not jemalloc."""
    name = active_allocator()
    if name == "jemalloc" or not sys.platform.startswith("linux"):
        return name
    if malloc_choice() == "glibc":
        return f"{name} ({ENV}=glibc)"
    lib = find_jemalloc()
    if lib is None:
        return f"{name} (libjemalloc.so.2 not found: {INSTALL_HINT} for ~1.4x training tokens per CPU-second)"
    return f"{name} (not started through a SpecRelay command; LD_PRELOAD={lib} would choose jemalloc)"


def keep_large_pages() -> bool:
    """Under jemalloc: from now on this process keeps the pages of freed allocations over 8 MiB for reuse instead
    of returning them to the system at once (the large-allocation arena's `dirty_decay_ms` = -1; its default is 0).
    True when jemalloc took it; False elsewhere (glibc: nothing to do), when `MALLOC_CONF` sets jemalloc's decay
    (the user's choice wins) or when jemalloc runs without that arena (`oversize_threshold:0`).

    Only that arena: its allocations are a step's large activations and logits, the same sizes step after step.
    Never purging the other arenas too was faster still on the parity step (1.10x) but grew the demo recipe's RSS
    without bound (2.6 -> 20 GB in 1,000 steps), and no finite decay stopped the faults (docs/notes/issue-20.md)."""
    if active_allocator() != "jemalloc" or "decay_ms" in os.environ.get("MALLOC_CONF", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallctl = libc.mallctl
    except (OSError, AttributeError):
        return False
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p,
                        ctypes.c_size_t]
    threshold, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
    if mallctl(b"opt.oversize_threshold", ctypes.byref(threshold), ctypes.byref(size), None, 0) or not threshold.value:
        return False   # no large-allocation arena (turned off, however it was configured)
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    libc.free(libc.malloc(16 << 20))   # the large-allocation arena is made on first use: from here on it exists
    n, size = ctypes.c_uint(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_uint))
    if mallctl(b"arenas.narenas", ctypes.byref(n), ctypes.byref(size), None, 0) or n.value == 0:
        return False
    never = ctypes.c_ssize_t(-1)   # jemalloc makes that arena last, after the automatic ones
    if mallctl(f"arena.{n.value - 1}.dirty_decay_ms".encode(), None, None, ctypes.byref(never), ctypes.sizeof(never)):
        return False
    log.debug("jemalloc: pages of freed allocations over 8 MiB kept for reuse (arena %d)", n.value - 1)
    return True


def tune_malloc() -> bool:
    """Under glibc, apply the thresholds above; True if glibc accepted them (False elsewhere: nothing to tune)."""
    if active_allocator() != "glibc":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc thresholds: mmap %d, trim %d (%s)", MMAP_THRESHOLD, TRIM_THRESHOLD, "ok" if ok else "refused")
    return ok
