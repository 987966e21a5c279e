"""Where one fused EAGLE-3 training step spends its time on CPU, phase by phase, in one process.

Phases (medians over the timed steps, after one warm-up): the teacher (the frozen target lm_head's
full-vocabulary matmul + softmax over the draft vocabulary), the draft forward (fc + K TTT steps
of the layer), the loss (draft lm_head + soft CE over K steps; it computes the head's and the
hidden states' gradients in its forward), backward (the layer and fc, K steps), the optimizer.
Also the fraction of this machine's bf16 (or fp32) matmul throughput the step reaches, from a
FLOP count of its matmuls and a square matmul timed in the same process.

    python -m benchmarks.profile_train_step --seq-len 512          # SmolLM2-135M-sized draft, K=7
    python -m benchmarks.profile_train_step --smoke

Writes benchmarks/results/profile_train_step.{json,md}.
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

SMOLLM2 = dict(h=576, heads=9, kv=3, d=64, ffn=1536, V=49152, Vd=32000)
TINY = dict(h=64, heads=4, kv=2, d=16, ffn=128, V=512, Vd=256)


def matmul_peak(dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        t.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(t) / 1e9


def step_flops(s: dict, T: int, K: int, R: int) -> dict:
    """Matmul FLOPs of one step (forward x1, backward x2 for trained weights)."""
    h, H, V, Vd, f = s["h"], s["h"], s["V"], s["Vd"], s["ffn"]
    qkvo = 2 * T * h * (2 * h * 1 + 2 * s["kv"] * s["d"]) + 2 * T * s["heads"] * s["d"] * h   # q (2h in), k, v, o
    q_in = 2 * T * (2 * h) * s["heads"] * s["d"] + 2 * T * (2 * h) * 2 * s["kv"] * s["d"] + 2 * T * s["heads"] * s["d"] * h
    mlp = 3 * 2 * T * h * f
    attn = 2 * 2 * T * T / 2 * s["heads"] * s["d"]   # causal QK^T and PV
    layer = (q_in + mlp + attn) * K * 3
    fc = 2 * T * 3 * H * h * 3
    head = 2 * T * h * Vd * K * 3
    teacher = 2 * R * H * V
    del qkvo
    return {"teacher": teacher, "layer": layer, "fc": fc, "draft_head": head, "total": teacher + layer + fc + head}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--ttt-steps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from benchmarks.harness import markdown_table, write_results
    from draft_trainer.data.batch import Batch
    from draft_trainer.data.vocab import build_vocab_mapping
    from draft_trainer.methods.eagle3.fused_loss import fused_ttt_loss
    from draft_trainer.methods.eagle3.model import Eagle3Draft
    from draft_trainer.methods.eagle3.step import make_teacher
    from draft_trainer.model.precision import autocast, cast_frozen, compute_dtype
    from draft_trainer.model.tensors import shift_left
    from draft_trainer.selftest import _cfg

    s, T = (TINY, 64) if a.smoke else (SMOLLM2, a.seq_len)
    K = 3 if a.smoke else a.ttt_steps
    load0 = os.getloadavg()
    torch.manual_seed(0)
    model = Eagle3Draft(_cfg({**s, "T": T}))
    vocab = build_vocab_mapping(torch.randint(0, 1000, (s["V"],)), s["Vd"])
    model.set_vocab_mapping(vocab.d2t, vocab.t2d)
    cdt = compute_dtype("auto", "cpu")
    head = cast_frozen(model, torch.randn(s["V"], s["h"]) * 0.02, cdt)
    g = torch.Generator().manual_seed(1)
    batch = Batch([0], torch.randint(0, s["V"], (1, T), generator=g), torch.ones(1, T), torch.ones(1, T, dtype=torch.long),
                  torch.randn(1, T, 3 * s["h"], generator=g), teacher_BTH=torch.randn(1, T, s["h"], generator=g))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    phases: dict[str, list[float]] = {k: [] for k in ("teacher", "draft forward", "loss (head + soft CE)", "backward",
                                                      "optimizer", "step")}
    R = 0
    for i in range(a.steps + 1):
        t = [time.perf_counter()]
        opt.zero_grad(set_to_none=True)
        teacher = make_teacher(batch, head, vocab.used, vocab.t2d, vocab.target_to_draft)
        R = int(teacher.b_R.numel())
        t.append(time.perf_counter())
        with autocast(batch.aux_BT3H.device, cdt):
            g_steps = model(batch.aux_BT3H, shift_left(batch.input_ids_BT, 1), K, batch.attention_mask_BT)
        t.append(time.perf_counter())
        loss, _ = fused_ttt_loss(model, g_steps, teacher, compute_dtype=cdt)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        t.append(time.perf_counter())
        if i:
            for name, d in zip(list(phases)[:5], [t[j + 1] - t[j] for j in range(5)]):
                phases[name].append(d)
            phases["step"].append(t[-1] - t[0])
    med = {k: statistics.median(v) for k, v in phases.items()}
    flops = step_flops(s, T, K, R)
    peak = matmul_peak(cdt)
    rows = [{"phase": k, "seconds": v, "share": f"{v / med['step']:.0%}"} for k, v in med.items()]
    rows.append({"phase": "tokens/s", "seconds": "", "share": f"{T / med['step']:.0f}"})
    frac = flops["total"] / med["step"] / 1e9 / peak
    note = (f"T={T} K={K} {str(cdt).replace('torch.', '')} matmuls, {a.threads} threads, load average "
            f"{load0[0]:.1f} at start / {os.getloadavg()[0]:.1f} at end (shared machine). Matmul FLOPs per step "
            f"{flops['total'] / 1e9:.1f} G (teacher {flops['teacher'] / 1e9:.1f}, draft head {flops['draft_head'] / 1e9:.1f}, "
            f"layer {flops['layer'] / 1e9:.1f}, fc {flops['fc'] / 1e9:.1f}); this process's square {cdt} matmul: "
            f"{peak:.1f} GFLOP/s; the step reaches {frac:.0%} of it.")
    table = markdown_table(rows, ["phase", "seconds", "share"]) + "\n\n" + note
    write_results("profile_train_step" + ("_smoke" if a.smoke else ""),
                  {"dims": s, "T": T, "K": K, "phases_s": phases, "median_s": med, "flops": flops,
                   "matmul_gflops": peak, "peak_fraction": frac, "load_avg": [load0, os.getloadavg()]}, table,
                  Path(a.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
