"""common/memory.py chooses the process's malloc (jemalloc when the system has it, by re-executing the command
under LD_PRELOAD); model/memory.py's release_free_heap gives the free pages inside glibc's heap back to the OS."""

import subprocess
import sys

import pytest

from common import memory
from tests.support.procs import REPO, env_with_repo, run_code

# Prints its PID, asks for jemalloc, then prints the allocator it runs on and its PID again: a re-executed
# process prints the first line twice (once per exec), with one PID throughout.
CHOOSE = ("import os\n"
          "print('pid', os.getpid(), flush=True)\n"
          "from common.memory import prefer_jemalloc, active_allocator, tune_malloc, describe_allocator\n"
          "prefer_jemalloc()\n"
          "print('on', active_allocator(), os.getpid(), tune_malloc())\n"
          "print(describe_allocator())\n")


def test_auto_reexecutes_under_jemalloc_when_the_system_has_it():
    res = run_code(CHOOSE, SPECRELAY_MALLOC="auto")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.split("\n")[:-1]
    pid = lines[0].split()[1]
    if memory.find_jemalloc() is None:      # e.g. a machine without libjemalloc2: glibc, run once, tuned
        assert lines[:2] == [f"pid {pid}", f"on glibc {pid} True"]
        assert lines[2].startswith("glibc (libjemalloc.so.2 not found: install it")
    else:                                   # same PID (os.execve), the command run again from the start
        assert lines == [f"pid {pid}", f"pid {pid}", f"on jemalloc {pid} False", "jemalloc"], lines
        assert "did not load" not in res.stderr


def test_glibc_choice_never_reexecutes_and_a_bad_choice_is_refused():
    res = run_code(CHOOSE, SPECRELAY_MALLOC="glibc")
    assert res.returncode == 0, res.stderr[-2000:]
    pid = res.stdout.split()[1]
    assert res.stdout.split("\n")[:-1] == [f"pid {pid}", f"on glibc {pid} True", "glibc (SPECRELAY_MALLOC=glibc)"]
    bad = run_code(CHOOSE, SPECRELAY_MALLOC="tcmalloc")
    assert bad.returncode != 0 and "SPECRELAY_MALLOC='tcmalloc' is not an allocator choice" in bad.stderr
    assert "auto, jemalloc, glibc" in bad.stderr


def test_jemalloc_choice_without_the_library_says_how_to_install_it(monkeypatch):
    monkeypatch.setenv("SPECRELAY_MALLOC", "jemalloc")
    monkeypatch.setattr(memory, "find_jemalloc", lambda: None)        # as on a machine without libjemalloc2
    monkeypatch.setattr(memory, "active_allocator", lambda: "glibc")
    with pytest.raises(SystemExit, match="libjemalloc.so.2 was not found: install it .*apt-get install libjemalloc2"):
        memory.prefer_jemalloc()


def test_allocator_env_starts_any_child_on_the_chosen_malloc():
    """For programs that do not choose themselves (a peer's trainer in the parity benchmark): glibc takes an
    inherited jemalloc out of LD_PRELOAD and keeps the other entries; jemalloc / auto put it in."""
    lib = memory.find_jemalloc()
    other = sys.executable    # an LD_PRELOAD entry that is not jemalloc (ld.so ignores a non-library, with a note)
    base = {**env_with_repo(), "LD_PRELOAD": ":".join(filter(None, [lib, other]))}

    def child(choice: str) -> tuple[str, str]:
        env = memory.allocator_env(choice, base)
        out = subprocess.run([sys.executable, "-c", "from common.memory import active_allocator as a; print(a())"],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip(), env.get("LD_PRELOAD", "")

    on, preload = child("glibc")
    assert on == "glibc" and preload == other and "jemalloc" not in preload
    assert memory.allocator_env("glibc", base)["SPECRELAY_MALLOC"] == "glibc"   # a SpecRelay CLI inside stays
    if lib is None:                        # a machine without libjemalloc2: auto is glibc, jemalloc an error
        assert child("auto")[0] == "glibc"
        with pytest.raises(SystemExit, match="libjemalloc.so.2 was not found: install it"):
            memory.allocator_env("jemalloc", base)
    else:
        for choice in ("auto", "jemalloc"):
            on, preload = child(choice)
            assert on == "jemalloc" and preload.split(":") == [lib, other], (choice, preload)
    with pytest.raises(SystemExit, match="allocator 'tcmalloc': use one of auto, jemalloc, glibc"):
        memory.allocator_env("tcmalloc", base)


# Allocates, writes and frees a 64 MiB buffer 8 times (through whichever malloc the process runs on; jemalloc
# serves it from its large-allocation arena), before and after keep_large_pages(): the minor page faults of each
# round of 8, and what keep_large_pages answered.
CYCLES = ("import ctypes, resource\n"
          "from common.memory import keep_large_pages\n"
          "libc = ctypes.CDLL(None)\n"
          "libc.malloc.restype = ctypes.c_void_p\n"
          "libc.free.argtypes = [ctypes.c_void_p]\n"
          "def faults():\n"
          "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
          "    for _ in range(8):\n"
          "        p = libc.malloc(64 << 20); ctypes.memset(p, 1, 64 << 20); libc.free(p)\n"
          "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
          "default = faults()\n"
          "kept = keep_large_pages()\n"
          "print(default, kept, faults(), faults())\n")


def test_keep_large_pages_stops_large_buffers_faulting_back_in_every_time():
    """A training step frees and re-allocates the same large buffers (DFlash's: hundreds of MiB): jemalloc's
    defaults give their pages back at once and fault them in again (DFlash: 0.76x glibc's speed); after
    keep_large_pages() they are reused."""
    if memory.find_jemalloc() is None:
        pytest.skip("needs libjemalloc.so.2 (apt-get install libjemalloc2; CI installs it)")
    pages = (64 << 20) // 4096
    res = run_code(CYCLES, LD_PRELOAD=memory.find_jemalloc(), MALLOC_CONF="")
    assert res.returncode == 0, res.stderr[-2000:]
    default, kept, after, again = res.stdout.split()
    assert kept == "True"
    assert int(default) > 6 * pages, res.stdout            # each round faults its 16k pages in anew
    assert int(after) < 2 * pages and int(again) < pages // 4, res.stdout   # the first round's pages, then none
    # a user's own decay or large-allocation threshold in MALLOC_CONF wins; under glibc there is nothing to keep
    for conf in ("dirty_decay_ms:5000", "oversize_threshold:0"):
        assert run_code(CYCLES, LD_PRELOAD=memory.find_jemalloc(), MALLOC_CONF=conf).stdout.split()[1] == "False"
    assert run_code(CYCLES, LD_PRELOAD="").stdout.split()[1] == "False"


def test_release_free_heap_returns_interior_free_pages():
    # Fresh process (glibc: pytest's environment has no preload): 2,000 tensors of 64 KB (below glibc's initial
    # mmap threshold: heap chunks), every tenth kept, so the freed ones are holes inside the heap that free()
    # alone leaves resident.
    code = ("import torch\n"
            "from draft_trainer.model.memory import release_free_heap\n"
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
            "keep, tmp = [], []\n"
            "for i in range(2000):\n"
            "    (keep if i % 10 == 0 else tmp).append(torch.ones(16 * 1024))\n"
            "del tmp\n"
            "before = rss()\n"
            "release_free_heap('cpu')\n"
            "print(before - rss(), sum(float(t.sum()) for t in keep))\n")
    res = run_code(code)
    assert res.returncode == 0, res.stderr[-2000:]
    freed_mb, total = map(float, res.stdout.split())
    assert total == 200 * 16 * 1024                       # the kept tensors are intact
    assert freed_mb > 0.7 * 1800 * 64 / 1024, freed_mb    # most of the ~112 MB freed went back
