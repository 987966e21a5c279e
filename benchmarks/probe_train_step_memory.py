"""Where the peak RSS of the fused EAGLE-3 training step goes, phase by phase (bench_train_step's
configuration: SmolLM2-135M-sized draft, B=1, K=7, fused-auto = bf16 matmuls, fp32 master weights).

Each T runs in a fresh subprocess (peak RSS is per process). Inside it the process's peak is reset
before every phase (Linux: `echo 5 > /proc/self/clear_refs` resets VmHWM), so each row gives the RSS
after the phase and the highest RSS reached during it. Next to the RSS, tensor accounting: bytes of
the trainable parameters, their grads and AdamW states, the frozen tensors (by dtype), what autograd
saves for backward over the K TTT steps (a saved-tensors hook; storages counted once, parameters
and their autocast bf16 copies listed apart), and glibc's heap counters (mallinfo2: bytes in use,
free bytes the heap still holds).

    python -m benchmarks.probe_train_step_memory --seq-lens 512,1024
    python -m benchmarks.probe_train_step_memory --seq-lens 512 --env MALLOC_TRIM_THRESHOLD_=0
    python -m benchmarks.probe_train_step_memory --before 1082ed4   # that commit's code, then this checkout's
    python -m benchmarks.probe_train_step_memory --before 1082ed4,650cea9   # each commit in turn, then this one

With --before, each T runs on a `git archive` copy of each earlier commit and then on this checkout
(fresh processes, one after the other, same probe code), and the table puts the peaks side by side.

Writes benchmarks/results/probe_train_step_memory[_<name>].{json,md}.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20


def _status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) / 1024
    return out


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap() -> dict[str, float]:
    """glibc heap: in use (arenas + mmapped chunks) and free bytes still held by the arenas, MB."""
    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    f.restype = _MallInfo2
    m = f()
    return {"heap_in_use_mb": (m.uordblks + m.hblkhd) / MB, "heap_free_held_mb": m.fordblks / MB,
            "mmapped_mb": m.hblkhd / MB}


def worker(s: dict) -> dict:
    rows: list[dict] = []
    clock = [time.process_time()]

    def mark(phase: str) -> None:
        st = _status()
        now = time.process_time()
        rows.append({"phase": phase, "rss_mb": st["VmRSS"], "peak_in_phase_mb": st["VmHWM"], **_heap(),
                     "cpu_s": now - clock[0]})
        clock[0] = now
        _reset_peak()

    _reset_peak()
    import torch

    torch.set_num_threads(s["threads"])
    sys.path.insert(0, s["repo"])        # this checkout, or an earlier commit's copy (--before)
    import draft_trainer

    assert Path(draft_trainer.__file__).is_relative_to(s["repo"]), (draft_trainer.__file__, s["repo"])
    from benchmarks.bench_train_step import SMOLLM2
    from draft_trainer.data.batch import Batch
    from draft_trainer.data.vocab import build_vocab_mapping
    from draft_trainer.methods.eagle3.config import DraftConfig
    from draft_trainer.model.linear_ce import LinearSoftCE
    from draft_trainer.methods.eagle3.model import Eagle3Draft
    from draft_trainer.methods.eagle3 import step as step_mod
    from draft_trainer.methods.eagle3.step import make_teacher
    from draft_trainer.model.precision import cast_frozen, compute_dtype

    mark("python + torch + draft_trainer imports")
    d, B, T, K = SMOLLM2, s["B"], s["T"], s["K"]
    torch.manual_seed(0)
    cfg = DraftConfig(hidden_size=d["h"], target_hidden_size=d["H"], num_attention_heads=d["heads"],
                      num_key_value_heads=d["kv_heads"], head_dim=d["head_dim"], intermediate_size=d["ffn"],
                      vocab_size=d["V"], draft_vocab_size=d["Vd"], aux_layer_ids=[1, 14, 26], rms_norm_eps=1e-5,
                      max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 1e5})
    model = Eagle3Draft(cfg)
    vocab = build_vocab_mapping(torch.randint(0, 1000, (d["V"],)), d["Vd"])
    model.set_vocab_mapping(vocab.d2t, vocab.t2d)
    mark("draft model built (fp32)")
    cdt = compute_dtype("auto", "cpu")
    head = cast_frozen(model, torch.randn(d["V"], d["H"]).mul_(0.02), cdt)
    mark(f"frozen embedding + target lm_head cast to {str(cdt).replace('torch.', '')}")
    g = torch.Generator().manual_seed(1)
    batch = Batch(list(range(B)), torch.randint(0, d["V"], (B, T), generator=g), torch.ones(B, T),
                  torch.ones(B, T, dtype=torch.long), torch.randn(B, T, 3 * d["H"], generator=g),
                  teacher_BTH=torch.randn(B, T, d["H"], generator=g))
    params = [p for p in model.parameters() if p.requires_grad]
    try:        # the Trainer's optimizer (train/setup.py); earlier commits (--before) used torch's
        from draft_trainer.train.optim import AdamW
    except ImportError:
        AdamW = torch.optim.AdamW
    opt = AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=True)
    mark("batch + optimizer")

    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in params}
    saved: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in param_ptrs:
            kind = "parameters (no copy)"
        elif tuple(t.shape) in shapes and t.dtype != torch.float32:
            kind = "bf16 copies of weights (autocast)"
        else:
            kind = "activations"
        saved.setdefault(ptr, (kind, st.nbytes()))
        return t

    # train_step runs the forward, then calls the loss: the spy marks the boundary (after whatever
    # train_step does between them) and notes what the forward saved for backward.
    real_loss = step_mod.fused_ttt_loss
    fwd_saved: dict[int, tuple[str, int]] = {}
    tag = ""

    def loss_spy(*args, **kw):
        mark(tag + f"draft forward ({K} TTT steps, graph kept)")
        fwd_saved.clear()
        fwd_saved.update(saved)
        return real_loss(*args, **kw)

    step_mod.fused_ttt_loss = loss_spy
    loss_ctx: dict[str, int] = {}
    orig_forward = LinearSoftCE.forward

    def forward_spy(ctx, *a, **kw):
        out = orig_forward(ctx, *a, **kw)
        loss_ctx["dx + dW kept for backward"] = sum(x.untyped_storage().nbytes() for x in ctx.grads)
        return out

    LinearSoftCE.forward = staticmethod(forward_spy)
    acct = {}
    for i in range(s["steps"]):
        tag = f"step {i + 1}: "
        opt.zero_grad(set_to_none=True)
        teacher = make_teacher(batch, head, vocab.used, vocab.t2d, vocab.target_to_draft)
        mark(tag + "teacher (row distributions)")
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = step_mod.train_step(model, batch, head, vocab.used, vocab.t2d, vocab.target_to_draft, K,
                                          teacher=teacher)
        mark(tag + "loss forward (head + soft CE, grads computed)")
        loss.backward()
        del teacher
        mark(tag + "backward")
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        mark(tag + "clip")
        opt.step()
        mark(tag + "optimizer step")
        if i == 0:
            by_kind: dict[str, int] = {}
            for kind, n in fwd_saved.values():
                by_kind[kind] = by_kind.get(kind, 0) + n
            loss_saved = sum(n for p, (k, n) in saved.items() if p not in fwd_saved and k == "activations")
            acct = {f"saved for backward by the draft forward: {k}": v / MB for k, v in sorted(by_kind.items())}
            acct["saved for backward by the loss (activations)"] = loss_saved / MB
            acct.update({f"loss: {k}": v / MB for k, v in loss_ctx.items()})
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts) / MB   # noqa: E731
    frozen = [p for p in model.parameters() if not p.requires_grad] + [head]
    tensors = {"trainable parameters (fp32)": nbytes(params),
               "grads (fp32)": nbytes([p.grad for p in params if p.grad is not None]),
               "AdamW states": nbytes([t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]),
               **{f"frozen tensors ({dt})": nbytes([t for t in frozen if str(t.dtype) == dt])
                  for dt in sorted({str(t.dtype) for t in frozen})},
               "batch (ids, masks, aux, teacher hidden)": nbytes([batch.aux_BT3H, batch.teacher_BTH, batch.input_ids_BT,
                                                                   batch.loss_mask_BT, batch.attention_mask_BT]),
               **acct}
    return {"T": T, "B": B, "K": K, "threads": s["threads"], "phases": rows, "tensors_mb": tensors,
            "peak_rss_mb": max(r["peak_in_phase_mb"] for r in rows), "loss": float(loss.detach()),
            "last_step_cpu_s": sum(r["cpu_s"] for r in rows if r["phase"].startswith(f"step {s['steps']}:")),
            "median_step_cpu_s": statistics.median(sum(r["cpu_s"] for r in rows if r["phase"].startswith(f"step {i}:"))
                                                   for i in range(2, s["steps"] + 1)) if s["steps"] > 1 else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--seq-lens", default="512,1024")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ttt-steps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the worker (e.g. glibc malloc tunables)")
    ap.add_argument("--before", help="git revision(s), comma-separated, each measured first from a `git archive` copy")
    ap.add_argument("--name", default="")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    sys.path.insert(0, str(REPO))
    from benchmarks.harness import markdown_table, write_results

    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    for kv in a.env:
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"--env {kv!r}: write NAME=VALUE")
        env[k] = v
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        repos = {}
        for rev in filter(None, (a.before or "").split(",")):
            archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
            Path(tmp, rev).mkdir()
            subprocess.run(["tar", "-x", "-C", str(Path(tmp, rev))], input=archive, check=True)
            repos[rev] = str(Path(tmp, rev))
        repos["this checkout"] = str(REPO)
        results = []
        for T in (int(x) for x in a.seq_lens.split(",")):
            for label, repo in repos.items():
                spec = {"T": T, "B": a.batch, "K": a.ttt_steps, "steps": a.steps, "threads": a.threads, "repo": repo}
                res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                     cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
                lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
                if res.returncode or not lines:
                    raise SystemExit(f"worker {label} T={T} failed: {res.stderr.strip()[-2000:]}")
                results.append({"code": label, **json.loads(lines[-1])})
    md = []
    if a.before:
        md.append(markdown_table([{"code": r["code"], "T": r["T"], "peak RSS (MB)": r["peak_rss_mb"],
                                   "median step CPU s (steps 2..)": r["median_step_cpu_s"], "loss": f"{r['loss']:.5f}"}
                                  for r in results], ["code", "T", "peak RSS (MB)", "median step CPU s (steps 2..)", "loss"]) + "\n")
    for r in results:
        md.append(f"## {r['code']}: T={r['T']} B={r['B']} K={r['K']}, {r['threads']} thread(s): peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB, "
                  f"last step {r['last_step_cpu_s']:.2f} CPU-s\n")
        md.append(markdown_table([{"phase": p["phase"], "RSS after (MB)": p["rss_mb"],
                                   "peak in phase (MB)": p["peak_in_phase_mb"],
                                   "heap in use (MB)": p.get("heap_in_use_mb", ""),
                                   "heap free but held (MB)": p.get("heap_free_held_mb", ""),
                                   "CPU s": p["cpu_s"]} for p in r["phases"]],
                                 ["phase", "RSS after (MB)", "peak in phase (MB)", "heap in use (MB)",
                                  "heap free but held (MB)", "CPU s"]))
        md.append("\n" + markdown_table([{"tensors": k, "MB": v} for k, v in r["tensors_mb"].items()], ["tensors", "MB"])
                  + "\n")
    note = (f"Load average {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end. Worker environment: "
            f"{' '.join(a.env) or 'default'}. Peak per phase: VmHWM after resetting it at the previous row.")
    name = "probe_train_step_memory" + (f"_{a.name}" if a.name else "")
    write_results(name, {"results": results, "env": a.env, "load_avg": [load0, os.getloadavg()]},
                  "\n".join(md) + "\n" + note, Path(a.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
