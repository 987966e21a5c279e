"""Trainer throughput and memory: 1 vs 2 ranks (gloo, FSDP2), features from a live synthetic
target server vs from the feature cache (no server), with the data-wait fraction of each.

    python -m benchmarks.bench_trainer            # SmolLM2-sized draft (H=576, V=49152, Vd=32000, K=7)
    python -m benchmarks.bench_trainer --smoke    # tiny shapes, seconds

Each configuration is a fresh `draft-trainer train` process (torchrun for 2 ranks) so peak RSS
is honest; tokens/s counts steps after the first two (warm-up) from metrics.jsonl. The same
2 cores serve every configuration: 1 rank runs 2 torch threads, 2 ranks run 1 thread each.
The synthetic server costs almost no CPU, so "live" measures the trainer, the wire and the pool.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import REPO, Server, env, markdown_table, write_results

FULL = dict(H=576, V=49152, Vd=32000, K=7, min_len=384, max_len=512, samples=48, steps=12, batch=2)
SMOKE = dict(H=32, V=512, Vd=256, K=3, min_len=16, max_len=48, samples=16, steps=4, batch=2)


def train(out: Path, overrides: list[str], nproc: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "draft_trainer", "--log-level", "WARNING", "train"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    res = subprocess.run(cmd + [f"output_dir={out}", "progress=false", *overrides], capture_output=True, text=True,
                         env=env(threads), cwd=REPO, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"trainer failed:\n{res.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in recs if r.get("split", "train") == "train"][2:] or recs
    tokens = sum(r["tokens"] for r in steady)
    seconds = sum(r["step_time_s"] for r in steady)
    wait = sum(r["data_wait_s"] for r in steady)
    return {"tokens_per_s": tokens / seconds, "data_wait_fraction": wait / seconds,
            "peak_rss_mb_per_rank": [round(x) for x in summary["peak_rss_mb"]], "steps": summary["steps"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = p.parse_args(argv)
    d = SMOKE if args.smoke else FULL
    load_start = os.getloadavg()[0]  # the machine is shared: the load says how noisy the figures are
    work = Path(tempfile.mkdtemp(prefix="specrelay-bench-trainer-"))
    from draft_trainer.assets.tiny import build_synthetic_dataset

    data = build_synthetic_dataset(work / "data", d["samples"], vocab_size=d["V"], min_len=d["min_len"],
                                   max_len=d["max_len"])
    common = [f"data.path={data}", f"data.draft_vocab_size={d['Vd']}", f"model.ttt_steps={d['K']}",
              f"batch_size={d['batch']}", f"max_steps={d['steps']}", "optim.lr=1e-4"]
    server = Server("--backend", "synthetic", "--synthetic-hidden-size", str(d["H"]), "--synthetic-vocab-size",
                    str(d["V"]), "--dtype", "bf16", threads=1)
    cache = work / "cache"
    rows = []
    try:
        live = [*common, f"targets.endpoints={server.endpoint}"]
        # Fill the feature cache once (not measured), then the four measured runs.
        train(work / "fill", [*live, f"feature_cache.dir={cache}"], nproc=1, threads=2)
        for nproc in (1, 2):
            threads = 2 // nproc
            for source, extra in (("live synthetic server", live),
                                  ("feature cache (offline)", [*common, f"feature_cache.dir={cache}",
                                                               "feature_cache.offline=true"])):
                r = train(work / f"run-{nproc}-{len(rows)}", extra, nproc, threads)
                rows.append({"ranks": nproc, "threads/rank": threads, "features": source, **r})
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)  # the feature cache of a full run is ~100s of MB
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs 1 rank live"] = r["tokens_per_s"] / base
    table = markdown_table(rows, ["ranks", "threads/rank", "features", "tokens_per_s", "vs 1 rank live",
                                  "data_wait_fraction", "peak_rss_mb_per_rank", "steps"])
    write_results("trainer_smoke" if args.smoke else "trainer",
                  {"smoke": args.smoke, "config": d, "load_avg_start": load_start, "rows": rows}, table,
                  out_dir=args.out)


if __name__ == "__main__":
    main()
