"""EAGLE-3 training-step throughput and peak memory on CPU: reference vs fused vs SpecForge.

One step = K-step TTT forward + loss + backward + clip + AdamW, on random features for a
SmolLM2-135M-sized draft (h=576, 9/3 heads, head_dim 64, FFN 1536, V=49152, Vd=32000, K=7).
Every (implementation, T) runs in a fresh subprocess so peak RSS is honest; the figure is the
median step time after warm-up. SpecForge 0.2.0 runs in its own venv (recipe in
/work/shared/notes/specforge-cpu.md) through benchmarks/specforge_worker.py.

    python benchmarks/bench_train_step.py                    # full run (~15-25 min on 2 cores)
    python benchmarks/bench_train_step.py --smoke            # seconds: tiny dims, ours only
    python benchmarks/bench_train_step.py --specforge-python "$(benchmarks/specforge_setup.sh)"
    SPECFORGE_VENV=/path/to/venv python benchmarks/bench_train_step.py --impls fused-auto \
        --specforge-dtypes bfloat16 --threads 1          # the issue-19 comparison

The SpecForge venv is --specforge-venv, else $SPECFORGE_VENV (as benchmarks/specforge_setup.sh), else .venv-specforge in the
repository; --specforge-python overrides both. The "vs SpecForge" columns divide by --anchor (SpecForge
with bf16 parameters by default, the issue's target). Each result also carries the step's matmul FLOPs;
the fraction of this machine's bf16 matmul peak divides them per CPU-second by a 1-thread bf16 1024^3
matmul timed in the same run (the step's CPU time sums all its threads, so 1 thread is the peak's unit).

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
import tempfile
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
    from draft_trainer.train.optim import AdamW

    opt = AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=True)   # as the Trainer does (train/setup.py)
    times, cpu = [], []
    for i in range(s["warmup"] + s["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss, stats = train_step(model, batch, head, vocab.used, vocab.t2d, vocab.target_to_draft, s["K"],
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
            "loss": float(loss.detach()), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "matmul_flops": step_matmul_flops(d, B, T, s["K"], sum(stats.positions))}


def step_matmul_flops(d: dict, B: int, T: int, K: int, head_rows: int) -> float:
    """Matmul FLOPs of one fused step: forward x1, backward x2 for trained weights (profile_train_step's
    count), with the draft head over the rows the loss computes and the teacher over B*(T-1) rows."""
    sys.path.insert(0, str(REPO))
    from benchmarks.profile_train_step import step_flops

    f = step_flops({"h": d["h"], "heads": d["heads"], "kv": d["kv_heads"], "d": d["head_dim"], "ffn": d["ffn"],
                    "V": d["V"], "Vd": d["Vd"]}, T, K, B * (T - 1))
    return B * (f["layer"] + f["fc"]) + f["teacher"] + 2 * head_rows * d["h"] * d["Vd"] * 3


def bf16_matmul_gflops(reps: int = 10) -> float:
    """This machine's 1-thread bf16 1024^3 matmul, best of `reps` (in a fresh process: threads set once)."""
    code = ("import torch, json; torch.set_num_threads(1)\n"
            "from benchmarks.profile_train_step import matmul_peak\n"
            f"print(json.dumps(max(matmul_peak(torch.bfloat16, n=1024, reps={reps}) for _ in range(2))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    return float(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else float("nan")


def spawn(spec: dict, python: str | None, timeout: float, repo: Path = REPO) -> dict:
    """One measurement in a fresh process; `repo`: a checkout whose own worker (and code) runs ours."""
    if spec["impl"].startswith("specforge"):
        cmd = [python, str(HERE / "specforge_worker.py"), "--spec", json.dumps(spec)]
    else:
        cmd = [sys.executable, str(repo / "benchmarks" / "bench_train_step.py"), "--worker", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    load0 = os.getloadavg()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=repo)
    except subprocess.TimeoutExpired:
        return {"impl": spec["impl"], "T": spec["T"], "B": spec["B"], "error": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"impl": spec["impl"], "T": spec["T"], "B": spec["B"],
                "error": (res.stderr.strip().splitlines() or ["no output"])[-1][:500]}
    return {**json.loads(lines[-1]), "threads": spec["threads"], "load_avg": [load0[0], os.getloadavg()[0]]}


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    from common.hardware import cpu_has_bf16

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "avx512_bf16": cpu_has_bf16(), "load_avg_at_start": os.getloadavg()}


def table(results: list[dict], anchor: str = "specforge-bfloat16", peak_gflops: float | None = None) -> str:
    rows = [f"| impl | B | T | threads | tokens/s (wall) | tokens/CPU-s | peak RSS MB | vs {anchor} wall | "
            f"vs {anchor} CPU | vs {anchor} RSS | bf16 matmul peak reached (CPU time) | load avg |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    anchors = {(r["B"], r["T"]): r for r in results if r["impl"] == anchor and "error" not in r}
    for r in results:
        if "error" in r:
            rows.append(f"| {r['impl']} | {r['B']} | {r['T']} | | error: {r['error']} | | | | | | | |")
            continue
        frac = "-"
        if peak_gflops and r.get("matmul_flops"):
            frac = f"{r['matmul_flops'] / r['cpu_s'] / 1e9 / peak_gflops:.0%}"
        load = "-" if "load_avg" not in r else f"{r['load_avg'][0]:.1f} -> {r['load_avg'][1]:.1f}"
        a = anchors.get((r["B"], r["T"]))
        ratio = f"{r['tokens_per_s'] / a['tokens_per_s']:.2f}x" if a else "-"
        cpu = f"{r['tokens_per_cpu_s'] / a['tokens_per_cpu_s']:.2f}x" if a else "-"
        mem = f"{r['peak_rss_mb'] / a['peak_rss_mb']:.2f}x" if a else "-"
        rows.append(f"| {r['impl']} | {r['B']} | {r['T']} | {r.get('threads', '-')} | {r['tokens_per_s']:.1f} | "
                    f"{r['tokens_per_cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | {ratio} | {cpu} | {mem} | {frac} | {load} |")
    return "\n".join(rows)


def before_after(results: list[dict], tag: str) -> str:
    """Medians over rounds of this checkout vs the --before copy, per impl and T."""
    ok = [r for r in results if "error" not in r]
    rows = ["| impl | T | tokens/CPU-s before -> after | ratio | tokens/s (wall) ratio | peak RSS MB before -> after | "
            "ratio | rounds |", "|---|---|---|---|---|---|---|---|"]
    for impl in dict.fromkeys(r["impl"] for r in ok if r["impl"].endswith(tag)):
        base = impl[: -len(tag)]
        for T in dict.fromkeys(r["T"] for r in ok if r["impl"] == impl):
            b = [r for r in ok if r["impl"] == impl and r["T"] == T]
            a = [r for r in ok if r["impl"] == base and r["T"] == T]
            if not a:
                continue
            med = lambda rs, k: statistics.median(r[k] for r in rs)   # noqa: E731
            rows.append(f"| {base} | {T} | {med(b, 'tokens_per_cpu_s'):.1f} -> {med(a, 'tokens_per_cpu_s'):.1f} | "
                        f"{med(a, 'tokens_per_cpu_s') / med(b, 'tokens_per_cpu_s'):.2f}x | "
                        f"{med(a, 'tokens_per_s') / med(b, 'tokens_per_s'):.2f}x | {med(b, 'peak_rss_mb'):.0f} -> "
                        f"{med(a, 'peak_rss_mb'):.0f} | {med(a, 'peak_rss_mb') / med(b, 'peak_rss_mb'):.2f}x | "
                        f"{len(a)} |")
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
    ap.add_argument("--anchor", default="specforge-bfloat16", help="impl the 'vs' columns divide by")
    ap.add_argument("--no-peak", action="store_true", help="skip timing the bf16 matmul peak")
    ap.add_argument("--specforge-dtypes", default="float32,bfloat16")
    ap.add_argument("--before", help="also run our impls from a `git archive` copy of this revision (labelled "
                    "impl@REV), each next to this checkout's in fresh processes")
    ap.add_argument("--rounds", type=int, default=1, help="repeat everything, alternating the order of --before")
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
    mach = machine()        # before the runs: its load average is the one at the start
    results = []
    tmp = tempfile.TemporaryDirectory()
    repos = {"": REPO}
    if args.before:         # our impls also from an earlier commit's copy, alternating with this checkout
        archive = subprocess.run(["git", "archive", args.before], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp.name], input=archive, check=True)
        repos = {f"@{args.before}": Path(tmp.name), "": REPO}
    for rnd in range(args.rounds):
        for T in seq_lens:
            for impl in impls:
                for tag, repo in (repos.items() if rnd % 2 == 0 else reversed(repos.items())):
                    if tag and impl.startswith("specforge"):
                        continue
                    spec = {"impl": impl, "dims": dims, "B": args.batch, "T": T, "K": 3 if args.smoke else 7,
                            "steps": steps, "warmup": warmup, "threads": threads}
                    if impl.startswith("specforge"):
                        spec["dtype"] = impl.split("-", 1)[1]
                    r = {**spawn(spec, args.specforge_python, args.timeout, repo), "round": rnd}
                    r["impl"] = spec["impl"] + tag
                    print(json.dumps({k: v for k, v in r.items() if k != "step_s_all"}), flush=True)
                    results.append(r)
    tmp.cleanup()
    peak = None if args.smoke or args.no_peak else bf16_matmul_gflops()
    if args.anchor not in {r["impl"] for r in results if "error" not in r}:
        args.anchor = "specforge-float32"
    out = {"benchmark": "train_step", "dims": dims, "K": 3 if args.smoke else 7, "machine": mach,
           "load_avg_at_end": os.getloadavg(), "bf16_matmul_gflops_1thread": peak, "anchor": args.anchor,
           "note": "Median step time after warm-up, each config in a fresh process. tokens/CPU-s divides by the "
                   "process's CPU time (all threads): it is the robust figure when other jobs share the cores; "
                   "wall tokens/s is what an idle machine shows. The bf16 matmul peak column divides the step's "
                   "matmul FLOPs per CPU-second by this machine's 1-thread bf16 1024^3 matmul "
                   f"({peak or float('nan'):.0f} GFLOP/s, best of 20, timed in the same run); ours only (the count "
                   "is of our step's matmuls).",
           "results": results}
    res_dir = Path(args.out_dir)
    res_dir.mkdir(exist_ok=True)
    tmp = res_dir / f".{name}.json.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, res_dir / f"{name}.json")
    tab = table(results, args.anchor, peak)
    if args.before:
        tab += "\n\n" + before_after(results, f"@{args.before}")
    md = f"# {name}\n\nMachine: {out['machine']}\n\n{tab}\n\n{out['note']}\n"
    tmp = res_dir / f".{name}.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, res_dir / f"{name}.md")
    print(tab)
    return 1 if any("error" in r for r in results if not r["impl"].startswith("specforge")) else 0


if __name__ == "__main__":
    sys.exit(main())
