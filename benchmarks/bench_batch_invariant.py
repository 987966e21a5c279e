"""The cost of --batch-invariant on the HF backend: feature forwards of ragged samples batched
(padded, one pass) vs one sample per pass (what the flag does), same backend, same samples.

    python -m benchmarks.bench_batch_invariant            # SmolLM2-135M-Instruct bf16
    python -m benchmarks.bench_batch_invariant --smoke    # tiny model, seconds

Rounds alternate the two modes (ABAB); the figure is the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import torch

from benchmarks.harness import markdown_table, median, write_results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from target_server.backends.hf import HFBackend

    if args.smoke:
        from draft_trainer.assets import build_tiny_model

        model_dir = Path(os.environ.get("SPECRELAY_CACHE", "/tmp")) / "bench-generate-tiny"
        if not (model_dir / "config.json").is_file():
            build_tiny_model(model_dir, "llama")
        args.samples, args.rounds, name, dtype = 4, 1, "batch_invariant_smoke", "fp32"
    else:
        from draft_trainer.assets import fetch_smollm2

        model_dir, name, dtype = fetch_smollm2(install=False), "batch_invariant", "bf16"
    be = HFBackend(model_dir, dtype=dtype)
    rng = random.Random(0)
    seqs = [[rng.randrange(be.vocab_size) for _ in range(rng.randint(args.min_len, args.max_len))]
            for _ in range(args.samples)]
    tokens = sum(map(len, seqs))
    be.forward(seqs[:2], "hidden")  # warm-up
    times = {"batched": [], "per_sample": []}
    for r in range(args.rounds):
        for mode in (("batched", "per_sample") if r % 2 == 0 else ("per_sample", "batched")):
            be.batch_invariant = mode == "per_sample"
            t0 = time.perf_counter()
            be.forward(seqs, "hidden")
            times[mode].append(time.perf_counter() - t0)
    ratios = [b / p for b, p in zip(times["batched"], times["per_sample"])]
    rows = [{"mode": m, "tokens": tokens, "median_s": median(ts), "tokens_per_s": tokens / median(ts)}
            for m, ts in times.items()]
    table = markdown_table(rows, ["mode", "tokens", "median_s", "tokens_per_s"]) + \
        f"\n\n--batch-invariant throughput / batched: **{median(ratios):.2f}** (median of {args.rounds} ABAB rounds; " \
        f"{args.samples} samples of {args.min_len}-{args.max_len} tokens, {model_dir.name} {dtype})."
    write_results(name, {"times_s": times, "ratio_per_sample_over_batched": median(ratios), "tokens": tokens,
                         "sizes": vars(args)}, table, out_dir=Path(args.out) if args.out else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
