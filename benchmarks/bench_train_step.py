"""EAGLE-3 training-step throughput and peak memory on CPU: reference vs fused vs SpecForge.

One step = K-step TTT forward + loss + backward + clip + AdamW, on random features for a
SmolLM2-135M-sized draft (h=576, 9/3 heads, head_dim 64, FFN 1536, V=49152, Vd=32000, K=7).
Every (implementation, T) runs in a fresh subprocess so peak RSS is honest; the figure is the
median step time after warm-up. SpecForge 0.2.0 runs in its own venv (recipe in
/work/shared/notes/specforge-cpu.md) through benchmarks/specforge_worker.py.

    python benchmarks/bench_train_step.py                    # full run (~15-25 min on 2 cores)
    python benchmarks/bench_train_step.py --smoke            # seconds: tiny dims, ours only
    python benchmarks/bench_train_step.py --specforge-python "$(benchmarks/specforge_setup.sh)"
    SPECFORGE_VENV=/path/to/venv python benchmarks/bench_train_step.py     # or --specforge-venv

Writes benchmarks/results/<name>.json and a markdown table next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SMOLLM2 = dict(h=576, H=576, heads=9, kv_heads=3, head_dim=64, ffn=1536, V=49152, Vd=32000)
TINY = dict(h=64, H=64, heads=4, kv_heads=2, head_dim=16, ffn=128, V=512, Vd=256)


def run_ours(s: dict) -> dict:
    """One measurement of our train_step in this process (called in a fresh subprocess)."""
    import torch

    torch.set_num_threads(s["threads"])
    torch.manual_seed(0)
    sys.path.insert(0, str(REPO))
    from draft_trainer.data.vocab import build_vocab_mapping
    from draft_trainer.methods.eagle3.config import DraftConfig
    from draft_trainer.methods.eagle3.model import Eagle3Draft
    from draft_trainer.model.precision import cast_frozen, compute_dtype
    from draft_trainer.data.batch import Batch
    from draft_trainer.methods.eagle3.step import train_step

    d = s["dims"]
    cfg = DraftConfig(hidden_size=d["h"], target_hidden_size=d["H"], num_attention_heads=d["heads"],
                      num_key_value_heads=d["kv_heads"], head_dim=d["head_dim"], intermediate_size=d["ffn"],
                      vocab_size=d["V"], draft_vocab_size=d["Vd"], aux_layer_ids=[1, 14, 26], rms_norm_eps=1e-5,
                      max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 1e5})
    model = Eagle3Draft(cfg)
    counts = torch.randint(0, 1000, (d["V"],))
    vocab = build_vocab_mapping(counts, d["Vd"])
    model.set_vocab_mapping(vocab.d2t, vocab.t2d)
    impl, precision = s["impl"].split("-")
    head = torch.randn(d["V"], d["H"]).mul_(0.02)
    if impl == "fused":     # what the Trainer does: frozen tensors in the compute dtype
        head = cast_frozen(model, head, compute_dtype(precision, "cpu"))
    B, T = s["B"], s["T"]
    g = torch.Generator().manual_seed(1)
    batch = Batch(list(range(B)), torch.randint(0, d["V"], (B, T), generator=g), torch.ones(B, T),
                  torch.ones(B, T, dtype=torch.long), torch.randn(B, T, 3 * d["H"], generator=g),
                  teacher_BTH=torch.randn(B, T, d["H"], generator=g))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=True)   # as the Trainer does
    times, cpu = [], []
    for i in range(s["warmup"] + s["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss, _ = train_step(model, batch, head, vocab.used, vocab.t2d, vocab.target_to_draft, s["K"],
                             impl=impl, precision=precision)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        if i >= s["warmup"]:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    med = statistics.median(times)
    return {"impl": s["impl"], "B": B, "T": T, "step_s": med, "step_s_all": times, "tokens_per_s": B * T / med,
            "cpu_s": statistics.median(cpu), "tokens_per_cpu_s": B * T / statistics.median(cpu),
            "loss": float(loss.detach()), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def spawn(spec: dict, python: str | None, timeout: float) -> dict:
    if spec["impl"].startswith("specforge"):
        cmd = [python, str(HERE / "specforge_worker.py"), "--spec", json.dumps(spec)]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"impl": spec["impl"], "T": spec["T"], "B": spec["B"], "error": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"impl": spec["impl"], "T": spec["T"], "B": spec["B"],
                "error": (res.stderr.strip().splitlines() or ["no output"])[-1][:500]}
    return json.loads(lines[-1])


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    from draft_trainer.model.precision import cpu_has_bf16

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "avx512_bf16": cpu_has_bf16(), "load_avg_at_start": os.getloadavg()}


def table(results: list[dict]) -> str:
    rows = ["| impl | B | T | tokens/s (wall) | tokens/CPU-s | peak RSS MB | vs SpecForge wall | vs SpecForge CPU | "
            "vs SpecForge RSS |", "|---|---|---|---|---|---|---|---|---|"]
    anchors = {(r["B"], r["T"]): r for r in results if r["impl"] == "specforge-float32" and "error" not in r}
    for r in results:
        if "error" in r:
            rows.append(f"| {r['impl']} | {r['B']} | {r['T']} | error: {r['error']} | | | | | |")
            continue
        a = anchors.get((r["B"], r["T"]))
        ratio = f"{r['tokens_per_s'] / a['tokens_per_s']:.2f}x" if a else "-"
        cpu = f"{r['tokens_per_cpu_s'] / a['tokens_per_cpu_s']:.2f}x" if a else "-"
        mem = f"{r['peak_rss_mb'] / a['peak_rss_mb']:.2f}x" if a else "-"
        rows.append(f"| {r['impl']} | {r['B']} | {r['T']} | {r['tokens_per_s']:.1f} | {r['tokens_per_cpu_s']:.1f} | "
                    f"{r['peak_rss_mb']:.0f} | {ratio} | {cpu} | {mem} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="tiny dims, few steps, ours only (seconds)")
    ap.add_argument("--seq-lens", default="512,1024")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--impls", default="reference-fp32,fused-fp32,fused-auto")
    ap.add_argument("--specforge-venv", help="venv with specforge==0.2.0 (default: $SPECFORGE_VENV, else "
                    "<repo>/.venv-specforge; benchmarks/specforge_setup.sh makes it; skipped if missing)")
    ap.add_argument("--specforge-python", help="that venv's python (overrides --specforge-venv)")
    ap.add_argument("--specforge-dtypes", default="float32,bfloat16")
    ap.add_argument("--name", default=None)
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(run_ours(json.loads(args.worker))))
        return 0
    sys.path.insert(0, str(REPO))
    dims, name = (TINY, "bench_train_step_smoke") if args.smoke else (SMOLLM2, "bench_train_step")
    name = args.name or name
    seq_lens = [64] if args.smoke else [int(x) for x in args.seq_lens.split(",")]
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    threads = 1 if args.smoke else args.threads   # smoke: no OpenMP oversubscription on a busy box
    impls = args.impls.split(",")
    args.specforge_python = args.specforge_python or str(
        Path(args.specforge_venv or os.environ.get("SPECFORGE_VENV") or REPO / ".venv-specforge") / "bin" / "python")
    if not args.smoke and Path(args.specforge_python).is_file():
        impls += [f"specforge-{dt}" for dt in args.specforge_dtypes.split(",") if dt]
    results = []
    for T in seq_lens:
        for impl in impls:
            spec = {"impl": impl, "dims": dims, "B": args.batch, "T": T, "K": 3 if args.smoke else 7,
                    "steps": steps, "warmup": warmup, "threads": threads}
            if impl.startswith("specforge"):
                spec["dtype"] = impl.split("-", 1)[1]
            r = spawn(spec, args.specforge_python, args.timeout)
            print(json.dumps({k: v for k, v in r.items() if k != "step_s_all"}), flush=True)
            results.append(r)
    out = {"benchmark": "train_step", "dims": dims, "K": 3 if args.smoke else 7, "machine": machine(),
           "note": "Median step time after warm-up, each config in a fresh process. tokens/CPU-s divides by the "
                   "process's CPU time (all threads): it is the robust figure when other jobs share the cores; "
                   "wall tokens/s is what an idle machine shows.",
           "results": results}
    res_dir = Path(args.out_dir)
    res_dir.mkdir(exist_ok=True)
    tmp = res_dir / f".{name}.json.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, res_dir / f"{name}.json")
    md = f"# {name}\n\nMachine: {out['machine']}\n\n{table(results)}\n\n{out['note']}\n"
    (res_dir / f"{name}.md").write_text(md)
    print(table(results))
    return 1 if any("error" in r for r in results if not r["impl"].startswith("specforge")) else 0


if __name__ == "__main__":
    sys.exit(main())
