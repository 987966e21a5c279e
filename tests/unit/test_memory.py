"""release_free_heap (model/memory.py) gives the free pages inside glibc's heap back to the OS."""

from tests.support.procs import run_code


def test_release_free_heap_returns_interior_free_pages():
    # Fresh process: 2,000 tensors of 64 KB (below glibc's initial mmap threshold: heap chunks), every
    # tenth kept, so the freed ones are holes inside the heap that free() alone leaves resident.
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
