"""One DFlash training step (draft forward, block loss over the full target vocabulary, backward), this
checkout against an earlier commit's DFlash code (`methods/dflash/objective.py` and `model.py`, or only
the objective with `--swap objective`): CPU seconds per step and the process's peak RSS, each side in its
own fresh process (peak RSS is per process), sides alternating.

    python -m benchmarks.bench_dflash_step --before main                    # SmolLM2-sized, B=2 T=512, 1 thread
    python -m benchmarks.bench_dflash_step --before 8481d54 --anchors 128 --swap objective

The draft is SmolLM2-135M's DFlash shape (5 layers at the target's width, V=49,152, block 16), random
weights, features and tokens; every position is supervised, so 512 anchors per sample as in training.
Writes benchmarks/results/bench_dflash_step[_T.._anchors..].{json,md}.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SWAPPABLE = {"objective": "draft_trainer/methods/dflash/objective.py", "model": "draft_trainer/methods/dflash/model.py"}


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(a) -> dict:
    """One side: `a.side` is 'after' (this checkout) or a git revision."""
    torch.set_num_threads(a.threads)
    from benchmarks.harness import load_module_at
    from benchmarks.profile_train_step import SMOLLM2
    from draft_trainer.methods.dflash import objective as obj_after
    from draft_trainer.methods.dflash.config import DFlashConfig
    from draft_trainer.methods.dflash import model as model_after
    from draft_trainer.model.precision import autocast, compute_dtype

    swap = a.swap.split(",") if a.side != "after" else []
    obj, mod = obj_after, model_after
    if "objective" in swap:
        obj = load_module_at(a.side, SWAPPABLE["objective"], "dflash_objective_before")
    if "model" in swap:
        mod = load_module_at(a.side, SWAPPABLE["model"], "dflash_model_before")
    s, B, T = SMOLLM2, a.batch, a.seq_len
    cfg = DFlashConfig(hidden_size=s["h"], num_hidden_layers=5, num_attention_heads=s["heads"],
                       num_key_value_heads=s["kv"], head_dim=s["d"], intermediate_size=s["ffn"], vocab_size=s["V"],
                       target_layer_ids=[1, 7, 14, 20, 27], num_target_layers=30, mask_token_id=2,
                       num_anchors=a.anchors)
    torch.manual_seed(0)
    model = mod.DFlashDraft(cfg)
    cdt = compute_dtype("auto", "cpu")
    embed = (torch.randn(s["V"], s["h"]) * 0.02).to(cdt)
    head = (torch.randn(s["V"], s["h"]) * 0.02).to(cdt)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, s["V"], (B, T), generator=g)
    feats = torch.randn(B, T, 5 * s["h"], generator=g)
    mask = torch.ones(B, T)
    cpu, wall = [], []
    for i in range(a.steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        anchors, keep = obj.sample_anchors(mask, cfg.block_size, cfg.num_anchors, obj.batch_generator([i]))
        tg = obj.block_targets(ids, mask, anchors, keep, cfg.block_size, cfg.mask_token_id, cfg.loss_decay_gamma)
        noise = torch.nn.functional.embedding(tg.noise_ids_BQ, embed)
        vis = obj.context_visibility(anchors, mask, cfg.block_size)
        pos = torch.arange(T)[None].expand(B, T)
        with autocast("cpu", cdt):
            hidden = model(feats, noise, pos, tg.pos_q_BQ, vis)
        if "compute_dtype" in inspect.signature(obj.block_loss).parameters:
            loss, _ = obj.block_loss(hidden, head, tg, None, compute_dtype=cdt)
        else:
            with autocast("cpu", cdt):
                loss, _ = obj.block_loss(hidden, head, tg, None)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocators and kernels
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - t0)
    positions = int(tg.valid_BNK.sum())
    return {"cpu_s_per_step": statistics.median(cpu), "wall_s_per_step": statistics.median(wall),
            "peak_rss_mb": _peak_rss_mb(), "loss": float(loss), "block_positions": positions,
            "anchors": int(keep.sum())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="git revision of the earlier DFlash code (the parent runs both sides)")
    ap.add_argument("--swap", default="objective,model", choices=["objective,model", "objective", "model"],
                    help="which of the revision's methods/dflash files the before side uses")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--anchors", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="processes per side, alternating")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    if a.side:
        print(json.dumps(_child(a)))
        return 0
    if not a.before:
        ap.error("--before REV is required")
    from benchmarks.harness import markdown_table, write_results

    runs = {"before": [], "after": []}
    for _ in range(a.rounds):
        for side, arg in (("before", a.before), ("after", "after")):
            cmd = [sys.executable, "-m", "benchmarks.bench_dflash_step", "--side", arg, "--seq-len", str(a.seq_len),
                   "--batch", str(a.batch), "--anchors", str(a.anchors), "--steps", str(a.steps),
                   "--threads", str(a.threads), "--swap", a.swap]
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ}, timeout=3600)
            if out.returncode:
                raise SystemExit(f"{side} side failed:\n{out.stderr[-3000:]}")
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(side, runs[side][-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", a.before], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    rows = []
    for side, rs in runs.items():
        rows.append({"side": side, "rev": f"{a.before} = {commit} ({a.swap})" if side == "before" else "this checkout",
                     "cpu_s_per_step": statistics.median(r["cpu_s_per_step"] for r in rs),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "loss": rs[0]["loss"],
                     "block_positions": rs[0]["block_positions"]})
    b, f = rows
    f["speed_vs_before"] = b["cpu_s_per_step"] / f["cpu_s_per_step"]
    f["rss_vs_before"] = f["peak_rss_mb"] / b["peak_rss_mb"]
    name = f"bench_dflash_step_T{a.seq_len}_anchors{a.anchors}"
    table = markdown_table(rows, ["side", "rev", "cpu_s_per_step", "peak_rss_mb", "speed_vs_before", "rss_vs_before",
                                  "loss", "block_positions"])
    table += (f"\n\nB={a.batch} T={a.seq_len} anchors<={a.anchors}, block 16, 5 layers, H=576, V=49,152, bf16 "
              f"compute, {a.threads} thread(s), {a.steps} timed steps per process, {a.rounds} processes per side.")
    path = write_results(name, {"args": vars(a), "rows": rows, "runs": runs}, table, Path(a.out_dir))
    print(table, f"\n-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
