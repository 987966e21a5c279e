"""One full fused EAGLE-3 training step, this checkout against an earlier commit, side by side in one
process: the earlier `fused_loss.py`, `ttt_fused.py` and `model.py` are loaded from git (the earlier
draft class gets this side's weights); same batch and threads; rounds alternate; medians, ratios.

    python -m benchmarks.bench_train_step_ab --before d132219     # SmolLM2-sized draft, B=2 T=512 K=7, bf16
    python -m benchmarks.bench_train_step_ab --before d132219 --ttt-steps 3     # the demo's K

A step is what the Trainer runs: the row teacher (frozen target lm_head), the K-step TTT forward
under bf16 autocast, the loss (draft lm_head + soft CE), backward, grad clipping and fused AdamW
(lr 0, so every round sees the same weights and the gradients of both sides can be compared).
Wall and process CPU time are both reported. One thread by default: on this shared 2-core box a
second OpenMP thread waits for a core at every op (an elementwise op on 300k floats took ~10 ms
with 2 threads under load 6, 0.06 ms with 1), which measures the other jobs, not the code.
Writes benchmarks/results/bench_train_step_ab[_B.._T.._K.._threads..].{json,md}.
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
FILES = {"fused_loss": "draft_trainer/methods/eagle3/fused_loss.py",
         "ttt_fused": "draft_trainer/methods/eagle3/ttt_fused.py",
         "model": "draft_trainer/methods/eagle3/model.py"}    # its layer methods; weights copied over


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="git revision of the earlier fused_loss.py / ttt_fused.py")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--ttt-steps", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from benchmarks.harness import load_module_at, markdown_table, write_results
    from benchmarks.profile_train_step import SMOLLM2, matmul_peak, step_flops
    from draft_trainer.data.vocab import build_vocab_mapping
    from draft_trainer.methods.eagle3 import fused_loss, model as model_mod, ttt_fused
    from draft_trainer.model.precision import autocast, cast_frozen, compute_dtype
    from draft_trainer.model.tensors import shift_left
    from draft_trainer.selftest import _cfg

    mods = {"before": {k: load_module_at(a.before, p, f"{k}_before") for k, p in FILES.items()},
            "after": {"fused_loss": fused_loss, "ttt_fused": ttt_fused, "model": model_mod}}
    s, B, T, K = SMOLLM2, a.batch, a.seq_len, a.ttt_steps
    torch.manual_seed(0)
    cfg = _cfg({**s, "T": T})
    vocab = build_vocab_mapping(torch.randint(0, 1000, (s["V"],)), s["Vd"])
    cdt = compute_dtype("auto", "cpu")
    head = torch.randn(s["V"], s["h"]) * 0.02
    state = None
    for m in mods.values():
        net = m["model"].Eagle3Draft(cfg)
        if state is None:
            state = net.state_dict()
        net.load_state_dict(state)
        net.set_vocab_mapping(vocab.d2t, vocab.t2d)
        m["head"] = cast_frozen(net, head, cdt)
        m["net"], m["params"] = net, [p for p in net.parameters() if p.requires_grad]
        m["opt"] = torch.optim.AdamW(m["params"], lr=0.0, betas=(0.9, 0.95), fused=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, s["V"], (B, T), generator=g)
    aux = torch.randn(B, T, 3 * s["h"], generator=g)
    teacher_BTH = torch.randn(B, T, s["h"], generator=g)
    mask = torch.ones(B, T, dtype=torch.long)

    def step(m) -> tuple[float, dict, int]:
        net = m["net"]
        m["opt"].zero_grad(set_to_none=True)
        teacher = m["fused_loss"].row_teacher_from_hidden(teacher_BTH, m["head"], vocab.used, vocab.t2d, mask,
                                                          compute_dtype=cdt)
        with autocast("cpu", cdt):
            g_steps = m["ttt_fused"].ttt_forward_fused(net, aux, shift_left(ids, 1), K, mask)
        loss, _ = m["fused_loss"].fused_ttt_loss(net, g_steps, teacher, compute_dtype=cdt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m["params"], 0.5)
        grads = {"lm_head": net.lm_head.weight.grad.clone(), "fc": net.fc.weight.grad.clone()}
        m["opt"].step()
        rows = sum(int(teacher.rows_for_step(k)[0].numel()) for k in range(K))   # draft-head rows computed
        return float(loss.detach()), grads, int(teacher.b_R.numel()), rows

    load0 = os.getloadavg()
    times: dict[str, list[float]] = {k: [] for k in mods}
    cpu: dict[str, list[float]] = {k: [] for k in mods}
    out = {}
    for r in range(a.rounds + 1):                 # round 0 warms both up
        for name in (list(mods) if r % 2 == 0 else list(mods)[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            out[name] = step(mods[name])
            if r:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    load1 = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    (lb, gb, R, N), (la, ga, _, _) = out["before"], out["after"]
    diffs = {k: float((ga[k] - gb[k]).norm() / gb[k].norm()) for k in gb}
    flops = step_flops(s, T, K, R)
    flops = {k: v * B if k != "teacher" else v for k, v in flops.items()}   # step_flops counts one sequence
    flops["draft_head"] = 2 * N * s["h"] * s["Vd"] * 3     # the rows the loss computes (supervised, in vocab)
    flops["total"] = sum(v for k, v in flops.items() if k != "total")
    peak = max(matmul_peak(cdt, n=2048, reps=10) for _ in range(2))   # best of 20: the box is shared
    rows = [{"step": f"{k} ({a.before if k == 'before' else 'this checkout'})", "wall s": v,
             "tokens/s (wall)": f"{B * T / v:.0f}", "vs before (wall)": f"{med['before'] / v:.2f}x",
             "CPU s": med_cpu[k], "tokens/CPU-s": f"{B * T / med_cpu[k]:.0f}",
             "vs before (CPU)": f"{med_cpu['before'] / med_cpu[k]:.2f}x",
             "bf16 matmul peak reached (CPU time)": f"{flops['total'] / med_cpu[k] / 1e9 / peak:.0%}"}
            for k, v in med.items()]
    note = (f"SmolLM2-sized draft (h=576, 9/3 heads, FFN 1536, V=49152, Vd=32000), B={B} T={T} K={K}, "
            f"{str(cdt).replace('torch.', '')} autocast, {a.threads} thread(s), {a.rounds} alternating rounds after a "
            f"warm-up, medians; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end (shared machine: use the "
            f"ratios; with one thread the process CPU time leaves out the time spent waiting for a core). "
            f"Loss before/after {lb:.5f} / {la:.5f}; gradient relative difference after vs before: lm_head "
            f"{diffs['lm_head']:.1e}, fc {diffs['fc']:.1e}. Matmul FLOPs per step {flops['total'] / 1e9:.0f} G "
            f"(draft head {flops['draft_head'] / 1e9:.0f} G over the {N} rows with a teacher, layer "
            f"{flops['layer'] / 1e9:.0f} G, teacher {flops['teacher'] / 1e9:.0f} G); this process's square "
            f"{cdt} matmul "
            f"({a.threads} thread(s), 2048^3, best of 20) {peak:.0f} GFLOP/s.")
    default = (B, T, K, a.threads) == (2, 512, 7, 1)
    name = "bench_train_step_ab" + ("" if default else f"_B{B}_T{T}_K{K}_threads{a.threads}")
    write_results(name, {"before": a.before, "B": B, "T": T, "K": K, "threads": a.threads,
                                          "times": times, "cpu_times": cpu, "median_s": med,
                                          "median_cpu_s": med_cpu, "loss": [lb, la], "grad_rel_diff": diffs,
                                          "flops": flops, "matmul_gflops": peak, "load_avg": [load0, load1]},
                  markdown_table(rows, list(rows[0])) + "\n\n" + note, Path(a.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
