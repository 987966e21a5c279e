"""Fused TTT forward + backward: this checkout's ttt_fused.py against an earlier commit's, side by
side in one process (same model, inputs, threads; rounds alternate; medians).

    python -m benchmarks.bench_ttt_diag --before 7ca9378      # SmolLM2-sized attention, T=512, K=7, bf16

Used for issue 19's diagonal-term change (grouped views instead of repeat_interleave copies).
Writes benchmarks/results/bench_ttt_diag.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PATH = "draft_trainer/methods/eagle3/ttt_fused.py"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="git revision of the earlier ttt_fused.py")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ttt-steps", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from benchmarks.harness import load_module_at, markdown_table, write_results
    from benchmarks.profile_train_step import SMOLLM2
    from draft_trainer.methods.eagle3 import ttt_fused
    from draft_trainer.methods.eagle3.model import Eagle3Draft
    from draft_trainer.model.precision import autocast
    from draft_trainer.selftest import _cfg

    before = load_module_at(a.before, PATH, "ttt_fused_before")
    T, K = a.seq_len, a.ttt_steps
    torch.manual_seed(0)
    model = Eagle3Draft(_cfg({**SMOLLM2, "T": T}))
    g = torch.Generator().manual_seed(1)
    aux = torch.randn(1, T, 3 * SMOLLM2["h"], generator=g)
    ids = torch.randint(0, SMOLLM2["V"], (1, T), generator=g)
    am = torch.ones(1, T, dtype=torch.long)
    load0 = os.getloadavg()[0]
    impls = {"before": before.ttt_forward_fused, "after": ttt_fused.ttt_forward_fused}
    times: dict[str, list[float]] = {k: [] for k in impls}
    grads = {}
    for r in range(a.rounds + 1):
        for name in (list(impls) if r % 2 == 0 else list(impls)[::-1]):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with autocast("cpu", torch.bfloat16):
                outs = impls[name](model, aux, ids, K, am)
            sum(o.float().square().mean() for o in outs).backward()
            if r:
                times[name].append(time.perf_counter() - t0)
            grads[name] = model.fc.weight.grad.clone()
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = float((grads["after"] - grads["before"]).norm() / grads["before"].norm())
    rows = [{"ttt_fused.py": f"{k} ({a.before if k == 'before' else 'this checkout'})", "fwd+bwd s": v,
             "ratio": f"{med['before'] / v:.2f}x"} for k, v in med.items()]
    note = (f"SmolLM2-sized draft layer, B=1 T={T} K={K}, bf16 autocast, {a.threads} threads, {a.rounds} rounds "
            f"alternating; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end. fc.weight gradient "
            f"relative difference after/before: {diff:.1e}.")
    write_results("bench_ttt_diag", {"before": a.before, "T": T, "K": K, "times": times, "median_s": med,
                                     "grad_rel_diff": diff}, markdown_table(rows, list(rows[0])) + "\n\n" + note,
                  Path(a.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
