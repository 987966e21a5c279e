"""Feature-cache replay: training tokens in a fixed time with the target recomputing every epoch's
features vs reading later epochs back from the run's own cache (`feature_cache.replay`).

    python -m benchmarks.bench_replay --data runs/demo/data/onpolicy --minutes 8
    python -m benchmarks.bench_replay --smoke      # tiny model, seconds (what the suite's test runs)

Both arms run the demo's recipe (draft_trainer/configs/smollm2_cpu.yaml: trainer 1 thread beside a
1-thread embedded bf16 server) for the same wall-clock budget, one after the other, each a fresh
`draft-trainer train` process; the replay arm switches the trainer to `--replay-threads` threads while
an epoch needs no target. Reported per arm: training tokens, tokens per second of the run, epochs
reached, samples the target computed, and the losses' agreement over epoch 0 (run the same way in
both arms; the embedded server is not batch-invariant, so features differ in their last bits with
how requests were batched: bit-equality is tested with a batch-invariant server in
tests/integration/test_feature_replay.py).
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

from benchmarks.harness import REPO, env, markdown_table, write_results

RECIPE = REPO / "draft_trainer" / "configs" / "smollm2_cpu.yaml"


def train(out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "draft_trainer", "--log-level", "WARNING", "train", "--config", str(RECIPE)]
    res = subprocess.run(cmd + [f"output_dir={out}", "progress=false", "save_initial=false", *overrides],
                         capture_output=True, text=True, env=env(2), cwd=REPO, timeout=7200)
    if res.returncode != 0:
        raise RuntimeError(f"trainer failed:\n{res.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r.get("split", "train") == "train"]
    src = summary["pool"]
    computed = src["requested"] if "requested" in src else src.get("pulled", 0)
    return {"tokens": summary["tokens"], "steps": summary["steps"], "wall_s": summary["wall_s"],
            "tokens_per_s": summary["tokens"] / summary["wall_s"], "epochs": summary["cursors"][0][0] + 1,
            "target_samples": computed, "peak_rss_mb": round(max(summary["peak_rss_mb"])),
            "losses": [r["loss"] for r in train_recs],
            "epoch0_steps": sum(1 for r in train_recs if r["cursor"][0] == 0)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="a tokenized dataset (the demo's: runs/demo/data/onpolicy)")
    p.add_argument("--model", type=Path, default=None, help="target model (default: SmolLM2-135M-Instruct's cache)")
    p.add_argument("--minutes", type=float, default=8.0, help="training budget of each arm")
    p.add_argument("--replay-threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny model and data, a few seconds per arm")
    p.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = p.parse_args(argv)
    load_start = os.getloadavg()[0]   # the machine is shared: the load says how noisy the figures are
    work = Path(tempfile.mkdtemp(prefix="specrelay-bench-replay-"))
    extra = []
    try:
        if args.smoke:
            from draft_trainer.assets import build_tiny_model, cache_dir
            from draft_trainer.assets.tiny import build_tiny_dataset

            model = build_tiny_model(cache_dir() / "models" / "tiny-llama", "llama")
            data = build_tiny_dataset(model, work / "data", num_samples=16)
            extra = ["targets.embedded_dtype=fp32", "data.draft_vocab_size=256", "batch_size=4"]
            budget = 6.0
        else:
            if args.data is None:
                p.error("--data is required (or --smoke)")
            from draft_trainer import assets

            model, data, budget = args.model or assets.fetch_smollm2(), args.data, args.minutes * 60
        common = [f"data.path={data}", f"targets.embedded_model={model}", f"time_budget_s={budget}", *extra]
        rows = []
        for name, arm in (("every epoch from the target", ["feature_cache.dir=", "feature_cache.replay=false"]),
                          ("replay (feature_cache.replay)", [f"feature_cache.dir={work / 'cache'}",
                                                             "feature_cache.replay=true",
                                                             f"feature_cache.replay_threads={args.replay_threads}"])):
            rows.append({"arm": name, **train(work / f"run{len(rows)}", [*common, *arm])})
    finally:
        shutil.rmtree(work, ignore_errors=True)   # the cache of a full run is ~0.5 GB
    base, rep = rows
    # Epoch 0 runs the same way in both arms (features from the target, the same threads): equal losses.
    n = min(base["epoch0_steps"], rep["epoch0_steps"], len(base["losses"]), len(rep["losses"]))
    agree = max((abs(a - b) / max(abs(a), 1e-9) for a, b in zip(base["losses"][:n], rep["losses"][:n])), default=0.0)
    for r in rows:
        r["vs target every epoch"] = r["tokens"] / base["tokens"]
        del r["losses"]
    table = markdown_table(rows, ["arm", "tokens", "vs target every epoch", "tokens_per_s", "epochs", "target_samples",
                                  "steps", "peak_rss_mb", "wall_s"])
    table += (f"\n\nLosses over epoch 0 ({n} steps, run the same way in both arms): largest relative difference "
              f"{agree:.2e} (the embedded server is not batch-invariant: features differ in their last bits with "
              "request batching, and training steps amplify that).\n")
    write_results("replay_smoke" if args.smoke else "replay",
                  {"smoke": args.smoke, "minutes": budget / 60, "replay_threads": args.replay_threads,
                   "load_avg_start": load_start, "epoch0_steps_compared": n, "max_rel_loss_diff": agree, "rows": rows}, table, out_dir=args.out)


if __name__ == "__main__":
    main()
