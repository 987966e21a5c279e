"""Probe (not a benchmark entry): a parity worker (SpecRelay's, or SpecForge's with `--side specforge` run by
SpecForge's venv python) on the first N steps of a parity handoff, with the per-step heap trim (model/memory.py `release_free_heap`) on or off and glibc's thresholds default or tuned
(`common.memory.tune_malloc`, as the trainer CLI sets them). Prints the worker's JSON line, which carries
StepMeter's figures by quarter (tokens per CPU-second, system share, minor page faults per step).

Another allocator goes in front of the process, e.g. jemalloc (apt: libjemalloc2):

    H=runs/parity-300k-v32000/handoff.pt   # written by bench_parity_specforge.py
    python -m benchmarks.probe_parity_allocator --handoff $H --out runs/probe-trim --steps 372 &
    python -m benchmarks.probe_parity_allocator --handoff $H --out runs/probe-notrim --steps 372 --no-trim &
    wait
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python -m benchmarks.probe_parity_allocator \\
        --handoff $H --out runs/probe-jemalloc --steps 372 &
    python -m benchmarks.probe_parity_allocator --handoff $H --out runs/probe-tune-trim --steps 372 --tune &
    wait

    # SpecForge's step on both allocators (its venv's python; it compiles into a fresh inductor cache per run)
    .venv-specforge/bin/python benchmarks/probe_parity_allocator.py --side specforge --handoff $H \
        --out runs/probe-sf-glibc --steps 372 &
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 .venv-specforge/bin/python \
        benchmarks/probe_parity_allocator.py --side specforge --handoff $H --out runs/probe-sf-jemalloc --steps 372 &
    wait

(two at a time on 2 cores, one thread each; compare within a pair). Findings: docs/notes/issue-20.md, sessions 13-14.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--handoff", required=True)
    ap.add_argument("--out", required=True, help="directory for the worker's init/final states")
    ap.add_argument("--steps", type=int, default=0, help="train the first N planned steps (0: all)")
    ap.add_argument("--side", choices=("specrelay", "specforge"), default="specrelay", help="whose worker")
    ap.add_argument("--no-trim", action="store_true", help="skip the per-step malloc_trim (specrelay)")
    ap.add_argument("--tune", action="store_true", help="glibc thresholds as the trainer CLI sets them")
    a = ap.parse_args()
    if a.side == "specforge":   # its worker imports the helpers as the top-level module `parity_handoff`
        sys.path.insert(0, str(REPO / "benchmarks"))
        import parity_handoff as ph

        import os
        import tempfile

        Path(a.out).mkdir(parents=True, exist_ok=True)   # as the parity bench runs it: compiled afresh, 1 thread
        os.environ.update(TORCHINDUCTOR_COMPILE_THREADS="1",
                          TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor-", dir=a.out))
    else:
        sys.path.insert(0, str(REPO))
        import benchmarks.parity_handoff as ph

    if a.steps:
        full = ph.load_handoff

        def first_steps(path):
            h = full(path)
            h["order"] = h["order"][:a.steps]
            h["schedule"] = dict(h["schedule"], total_steps=a.steps)
            return h

        ph.load_handoff = first_steps   # the worker imports it from the module when it starts
    if a.no_trim:
        import draft_trainer.model.memory as mem

        mem._malloc_trim = lambda: None
    if a.tune:
        from common.memory import tune_malloc

        if not tune_malloc():
            raise SystemExit("glibc refused the thresholds (or this is not glibc)")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    sys.argv = ["specrelay_parity_worker", "--spec", json.dumps({"handoff": a.handoff, "out": a.out, "threads": 1})]
    runpy.run_path(str(REPO / "benchmarks" / f"{a.side}_parity_worker.py"), run_name="__main__")


if __name__ == "__main__":
    main()
