"""Peak memory of one TTT forward + backward vs sequence length: fused (flash + diagonal merge)
against the reference (K score matrices of [T, T] kept for backward), on CPU, small draft dims.

Each (path, T) runs in a fresh subprocess: the figure is the growth of the process's peak RSS
over its RSS just before the step (model, inputs and kernels already loaded by a T=16 warm-up),
so it counts the step's activations and temporaries. Linear growth = constant MB per 1k tokens.

    python -m benchmarks.bench_ttt_memory                       # T = 512..4096 fused, reference to 2048
    python -m benchmarks.bench_ttt_memory --seq-lens 256,512 --ref-max 512   # seconds

Writes benchmarks/results/bench_ttt_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIMS = dict(hidden_size=256, target_hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            intermediate_size=512, vocab_size=1024, draft_vocab_size=512)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(REPO))
    from draft_trainer.methods.eagle3.config import DraftConfig
    from draft_trainer.methods.eagle3.model import Eagle3Draft
    from draft_trainer.methods.eagle3.ttt_fused import ttt_forward_fused

    torch.manual_seed(0)
    cfg = DraftConfig(**DIMS, aux_layer_ids=[0, 1, 2], max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    model = Eagle3Draft(cfg)
    fn = model.ttt_forward if spec["path"] == "reference" else (lambda *a: ttt_forward_fused(model, *a))

    def step(T: int) -> None:
        aux = torch.randn(1, T, 3 * DIMS["target_hidden_size"])
        ids = torch.randint(0, DIMS["vocab_size"], (1, T))
        outs = fn(aux, ids, spec["K"], torch.ones(1, T, dtype=torch.long))
        sum(o.square().mean() for o in outs).backward()

    step(16)
    model.zero_grad(set_to_none=False)      # gradient buffers exist before the measurement
    before = _rss_mb()
    t0 = time.perf_counter()
    step(spec["T"])
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    growth = max(peak - before, 0.0)
    return {"path": spec["path"], "T": spec["T"], "K": spec["K"], "peak_growth_mb": growth,
            "mb_per_1k_tokens": growth / spec["T"] * 1000, "step_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--seq-lens", default="512,1024,2048,4096")
    ap.add_argument("--ref-max", type=int, default=2048, help="largest T for the reference (its memory is T^2 x K)")
    ap.add_argument("--steps", type=int, default=3, help="TTT steps K")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    sys.path.insert(0, str(REPO))
    from benchmarks.harness import markdown_table, write_results

    rows = []
    for T in [int(x) for x in args.seq_lens.split(",")]:
        for path in ("fused", "reference"):
            if path == "reference" and T > args.ref_max:
                continue
            spec = {"path": path, "T": T, "K": args.steps, "threads": args.threads}
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            res = subprocess.run([sys.executable, "-m", "benchmarks.bench_ttt_memory", "--worker", json.dumps(spec)],
                                 capture_output=True, text=True, timeout=args.timeout, cwd=REPO, env=env)
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if res.returncode == 0 and lines else \
                {"path": path, "T": T, "error": (res.stderr.strip().splitlines() or ["no output"])[-1][:300]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    table = markdown_table(rows, ["path", "T", "K", "peak_growth_mb", "mb_per_1k_tokens", "step_s", "error"])
    write_results("bench_ttt_memory", {"dims": DIMS, "results": rows,
                                       "note": "peak RSS growth of one TTT forward+backward over the RSS before it"},
                  table, Path(args.out_dir))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
