"""The target model in bf16 vs fp32 on this CPU, in the shapes SpecRelay runs it: what `--dtype auto` decides.

    python -m benchmarks.bench_target_dtype            # SmolLM2-135M-Instruct, ~4 min on 2 cores without native bf16
    python -m benchmarks.bench_target_dtype --smoke    # the tiny offline model, seconds

Shapes, each timed as the median of --reps runs (after one warm-up), both dtypes in this one process:
  features      a forward over B x T tokens with hidden states out (what a target server computes per batch)
  regeneration  batched greedy `generate` (the on-policy answers)
  greedy token  one cached decoding step (plain greedy decoding, the speed baseline of the evaluation)
  verification  one cached forward over K+1 = 6 tokens (a speculative round's target call at K=5)
Reports milliseconds, bf16/fp32 time ratios, the CPU's bf16 flags and what `auto` picks here
(common.hardware.pick_dtype: bf16 only with AVX512-BF16 or AMX).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import markdown_table, median, write_results
from common.hardware import cpu_has_bf16, pick_dtype

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ms(fn, reps: int, prepare=lambda: None) -> float:
    """Median wall milliseconds of fn(prepare()) over reps runs, after one warm-up."""
    fn(prepare())
    times = []
    for _ in range(reps):
        arg = prepare()
        t = time.perf_counter()
        fn(arg)
        times.append((time.perf_counter() - t) * 1000)
    return median(times)


def measure(model_dir: str, dtype: torch.dtype, shapes: dict, reps: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = lambda *shape: torch.randint(10, vocab, shape, generator=g)  # noqa: E731
    out = {}
    with torch.inference_mode():
        b, t = shapes["features"]
        x = ids(b, t)
        out["features"] = _ms(lambda _: model(x, output_hidden_states=True), reps)
        b, p, n = shapes["regeneration"]
        prompts = ids(b, p)
        out["regeneration"] = _ms(lambda _: model.generate(prompts, attention_mask=torch.ones_like(prompts),
                                                           max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                           pad_token_id=0), reps)
        ctx = shapes["context"]
        cache = model(ids(1, ctx), use_cache=True).past_key_values
        for name, k in (("greedy token", 1), ("verification", 6)):
            step = ids(1, k)
            out[name] = _ms(lambda c: model(step, past_key_values=c, use_cache=True), reps * 4,
                            prepare=lambda: copy.deepcopy(cache))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny offline model, small shapes")
    p.add_argument("--reps", type=int, default=2, help="timed runs per shape (cached steps: 4x this)")
    p.add_argument("--name", default="", help="result file stem (default target_dtype[_smoke])")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = p.parse_args(argv)
    from draft_trainer import assets

    if args.smoke:
        model = str(assets.build_tiny_model(Path(tempfile.mkdtemp(prefix="dtype-")) / "tiny", "llama"))
        shapes = {"features": (2, 64), "regeneration": (4, 16, 8), "context": 32}
    else:
        model = str(assets.fetch_smollm2(install=False))
        shapes = {"features": (2, 512), "regeneration": (32, 64, 32), "context": 200}
    ms = {name: measure(model, dt, shapes, args.reps) for name, dt in DTYPES.items()}
    what = {"features": "features: forward %d x %d tokens, hidden states out" % shapes["features"],
            "regeneration": "regeneration: generate %d prompts x %d tokens, %d new" % shapes["regeneration"],
            "greedy token": f"greedy token: 1-token cached step at context {shapes['context']}",
            "verification": f"verification: 6-token cached step at context {shapes['context']}"}
    rows = [{"shape": what[k], "fp32 ms": ms["fp32"][k], "bf16 ms": ms["bf16"][k],
             "bf16 / fp32 time": round(ms["bf16"][k] / ms["fp32"][k], 2)} for k in what]
    data = {"model": model, "shapes": shapes, "reps": args.reps, "ms": ms,
            "bf16_over_fp32": {k: ms["bf16"][k] / ms["fp32"][k] for k in what},
            "cpu_native_bf16": cpu_has_bf16(), "auto_picks": pick_dtype("auto"),
            "torch_capability": torch.backends.cpu.get_cpu_capability()}
    table = markdown_table(rows, ["shape", "fp32 ms", "bf16 ms", "bf16 / fp32 time"]) + (
        f"\n\nCPU capability {data['torch_capability']}, native bf16 (AVX512-BF16/AMX): {data['cpu_native_bf16']}; "
        f"`--dtype auto` picks **{data['auto_picks']}** here. {model}, {torch.get_num_threads()} threads, "
        f"median of {args.reps} runs ({4 * args.reps} for the cached steps), both dtypes in one process.")
    write_results(args.name or ("target_dtype_smoke" if args.smoke else "target_dtype"), data, table, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
