"""Draft quality side by side: EAGLE-3, EAGLE-3.1 and EAGLE-3 + LK losses trained on the same
data for the same tokens, acceptance length (tau) compared in one run.

    python -m benchmarks.bench_quality            # SmolLM2-135M-Instruct + ShareGPT (1500 steps per arm: hours)
    python -m benchmarks.bench_quality --data DIR --cache C --steps 150   # a prepared (e.g. on-policy) dataset;
                                                  # the first arm writes the feature cache, later arms train offline
    python -m benchmarks.bench_quality --smoke    # tiny offline Llama + built-in chats (seconds per arm)
    python -m benchmarks.bench_quality --arms eagle3,eagle3.1 --minutes 30
    python -m benchmarks.bench_quality --data DIR --cache C --arms eagle3,ttt3,lr5e-3 --jobs 2
                                                  # after the first arm, arms run 2 at a time (1 thread each)
    python -m benchmarks.bench_quality --arms eagle3,fp8     # tau with FP8 vs bf16 features at equal tokens (issue 19)

Every arm runs the same recipe (draft_trainer/configs/smollm2_cpu.yaml at full size, with plain
EAGLE-3 as the base: `BASE`) plus its one change, the same
seed, data order, batch size and number of optimizer steps, so each trains on exactly the same
tokens (checked: the run fails if the token counts differ). Per arm it reports
  sim_tau     simulated acceptance length of a greedy K-token chain on the held-out samples
              (the trainer's end-of-run evaluation: 1 + sum_k prod_{j<=k} cond_acc_j)
  exp_acc     mean over draft positions of sum_v min(p, q): acceptance under sampling
  tau         real acceptance length: greedy chain speculative decoding of the held-out prompts
              with the exported draft (`draft-trainer eval`), checked lossless against greedy
and the ratios to EAGLE-3 (targets of issue 15: EAGLE-3.1 >= 1.05x, LK >= 1.0x).
At --smoke size the figures only prove the pipeline (a tiny random target, seconds of training).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from benchmarks.harness import markdown_table, write_results

# Every arm changes one thing from the demo's recipe with plain EAGLE-3 (the recipe itself trains
# EAGLE-3.1 since 2026-12-06): "eagle3" stays the baseline the other arms are measured against.
BASE = ["model.eagle_variant=3"]
ARMS = {  # name -> model.* overrides
    "eagle3": [],
    "eagle3.1": ["model.eagle_variant=3.1"],
    "eagle3+lk_lambda": ["model.loss=lk_lambda", "model.lk_eta=3"],
    "eagle3+lk_alpha": ["model.loss=lk_alpha"],
    # recipe arms (issue 20): one change each from the demo's recipe
    "final_layer": ["model.feature_layers=[1,14,29]"],      # SmolLM2 (30 layers): the final norm's input as the high layer
    "init_random": ["model.init=random"],
    "ttt3": ["model.ttt_steps=3"],
    "lr1e-3": ["optim.lr=1e-3"],
    "lr5e-3": ["optim.lr=5e-3"],
    "bs4": ["batch_size=4"],
    "all_positions": ["data.supervise=all"],                 # prompt positions train too (the teacher labels them)
    "dflash": ["model.method=dflash", "model.init=random"],
    # issue 19: aux and teacher sent as e4m3 + per-token scales (the trainer upcasts them); always
    # from the live target, never from a cache another arm wrote (those hold full-precision features)
    "fp8": ["targets.wire_dtypes=aux=float8_e4m3,teacher=float8_e4m3"],
}
# overrides that change the features an arm trains on: such an arm neither reads nor writes --cache
OWN_FEATURES = ("model.feature_layers", "model.method", "targets.wire_dtypes")
DEFAULT_ARMS = "eagle3,eagle3.1,eagle3+lk_lambda"
FULL = dict(samples=4000, holdout=64, eval_prompts=16, max_new_tokens=64, K=5, steps=1500, max_length=512,
            vocab=8192, lr=2e-3)
SMOKE = dict(samples=64, holdout=8, eval_prompts=4, max_new_tokens=16, K=3, steps=12, max_length=128,
             vocab=256, lr=3e-3)


def prepare(work: Path, d: dict, smoke: bool) -> tuple[Path, Path, Path]:
    """(target model dir, tokenized dataset dir, held-out prompts file)."""
    from draft_trainer import assets
    from draft_trainer.data.prepare import HELDOUT_PROMPTS_FILE, PrepareConfig, prepare_data

    if smoke:
        model = assets.build_tiny_model(work / "tiny-llama", "llama")
        source = work / "chats.jsonl"
        source.write_text("".join(json.dumps(c) + "\n" for c in assets.tiny_conversations(d["samples"] + d["eval_prompts"])))
    else:
        model, source = assets.fetch_smollm2(), assets.locate_sharegpt()
    res = prepare_data(PrepareConfig(model=str(model), inputs=[str(source)], output=str(work / "data"),
                                     max_length=d["max_length"], min_supervised_tokens=1, skip_bad=True,
                                     workers=1, draft_vocab_size=d["vocab"], holdout=d["eval_prompts"],
                                     max_samples=d["samples"]))
    return model, res.path, res.path / HELDOUT_PROMPTS_FILE


def peak_rss_mb() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a
    spawned arm would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def train_arm(name: str, out: Path, model: Path, data: Path, d: dict, smoke: bool, minutes: float,
              cache: tuple[Path, bool] | None = None, extra: list[str] = ()) -> dict:
    from common.config import load_config
    from draft_trainer.config import TrainConfig
    from draft_trainer.train.loop import Trainer

    recipe = Path(__file__).resolve().parents[1] / "draft_trainer" / "configs" / "smollm2_cpu.yaml"
    overrides = [f"data.path={data}", f"targets.embedded_model={model}", f"output_dir={out}", "resume_from=",
                 "progress=false", f"max_steps={d['steps']}", f"model.ttt_steps={d['K']}", f"optim.lr={d['lr']}",
                 f"eval.holdout={d['holdout']}", "eval.every_steps=0", "seed=0", "optim.schedule=steps",
                 f"time_budget_s={minutes * 60 if minutes else 0}", *extra, *BASE, *ARMS[name]]
    if cache:  # the first arm writes the features, later arms with the same features read them offline
        overrides += [f"feature_cache.dir={cache[0]}", f"feature_cache.offline={str(cache[1]).lower()}"]
        if cache[1]:   # offline reads the cache anyway (the recipe's replay is for online runs)
            overrides += ["feature_cache.replay=false"]
    else:  # the recipe's own cache (replay) in the arm's directory: never another arm's, never the repo's runs/
        overrides += [f"feature_cache.dir={out / 'features'}"]
    if smoke:
        overrides += ["targets.embedded_dtype=fp32"]
    cfg = load_config(TrainConfig, recipe, overrides)
    t0, c0 = time.perf_counter(), time.process_time()
    summary = Trainer(cfg).run()
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("split", "train") == "train"]
    ev = [r for r in recs if r.get("split") == "eval"][-1]
    return {"arm": name, "steps": summary["steps"], "train_tokens": sum(int(r["tokens"]) for r in train),
            "train_s": round(train_s, 1), "train_cpu_s": round(train_cpu_s, 1),
            "peak_rss_mb": peak_rss_mb(), "sim_tau": ev["sim_accept_len"],
            "exp_acc": sum(ev["exp_acc"]) / len(ev["exp_acc"]), "acc0": ev["acc"][0],
            "eval_loss": ev["loss"], "overrides": ARMS[name]}


def real_tau(arm_dir: Path, model: Path, prompts: Path, d: dict, greedy: dict, dtype: str = "fp32") -> dict:
    from draft_trainer.eval import evaluate
    from draft_trainer.export import export_sglang
    from draft_trainer.train import checkpoint as ckpt_io

    last = ckpt_io.list_checkpoints(arm_dir / "checkpoints")[-1]
    export = export_sglang(last, arm_dir / "export", overwrite=True)
    r = evaluate(model, export, prompts, num_steps=d["K"], max_new_tokens=d["max_new_tokens"], greedy_cache=greedy,
                 dtype=dtype)
    if not r["lossless"]:
        raise SystemExit(f"bench_quality: {export} is not lossless against greedy decoding: {r['mismatches'][:3]}")
    return {"tau": r["tau"], "accept_per_position": r["accept_rate_per_position"],
            "prompt_lookup_tau": r["prompt_lookup"]["tau"]}


def run_arm(name: str, work: Path, model: Path, data: Path, prompts: Path, d: dict, args: argparse.Namespace,
            cache: tuple[Path, bool] | None, greedy: dict) -> dict:
    row = train_arm(name, work / name, model, data, d, args.smoke, args.minutes, cache, args.set)
    if not args.no_real_tau:
        row.update(real_tau(work / name, model, prompts, d, greedy, args.eval_dtype))
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny offline target and chats: proves the pipeline only")
    p.add_argument("--cache-ready", action="store_true",
                   help="--cache already holds this data's features (an earlier run wrote them): every arm, the "
                        "first too, trains offline from it")
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, from {list(ARMS)}")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per arm (default: 12 smoke, 1500 full)")
    p.add_argument("--minutes", type=float, default=0.0,
                   help="also stop each arm after this many minutes (then tokens may differ: the run says so)")
    p.add_argument("--no-real-tau", action="store_true", help="skip the speculative-decoding evaluation")
    p.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--data", type=Path, default=None,
                   help="a prepared dataset to train on (e.g. regenerated on-policy answers); default: ShareGPT")
    p.add_argument("--prompts", type=Path, default=None,
                   help="held-out prompts for the real tau (default: the prepared data's heldout_prompts.jsonl); "
                        "never trained on: take them from the split the data's conversations were drawn from")
    p.add_argument("--cache", type=Path, default=None,
                   help="feature cache: the first arm writes it, later arms reading the same features train "
                        "offline from it (no target compute)")
    p.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every arm")
    p.add_argument("--eval-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="target dtype of the real-tau evaluation (the training features' dtype is the recipe's bf16)")
    p.add_argument("--name", default=None, help="results file name (default bench_quality)")
    p.add_argument("--jobs", type=int, default=1,
                   help="arms after the first (every arm with --cache-ready) run this many at a time, each in its own "
                        "process (the recipe's 1 thread): quality figures are unaffected, train_s is then not "
                        "comparable")
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or "eagle3" not in arms:
        raise SystemExit(f"--arms: unknown {unknown}; choose from {list(ARMS)} and include eagle3 (the baseline)")
    d = dict(SMOKE if args.smoke else FULL)
    if args.steps:
        d["steps"] = args.steps
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="specrelay-bench-quality-"))
    rows, greedy = [], {}
    try:
        if args.data:
            from draft_trainer import assets

            model, data = assets.fetch_smollm2(install=False), args.data
            prompts = args.prompts or data / "heldout_prompts.jsonl"
        else:
            model, data, prompts = prepare(work, d, args.smoke)

        def cache_for(name: str, cached: bool):
            same_features = not any(o.startswith(OWN_FEATURES) for o in ARMS[name])
            return (args.cache, cached) if args.cache and same_features else None

        # The first arm runs here: it writes the feature cache (if it reads the common features) and
        # fills the greedy cache; later arms with the same features train offline from the cache, in a
        # pool with --jobs > 1. With the cache ready there is nothing to write first: all go to the pool.
        if args.jobs > 1 and args.cache_ready and len(arms) > 1:
            here, pooled = [], arms
        elif args.jobs > 1 and len(arms) > 2:
            here, pooled = arms[:1], arms[1:]
        else:
            here, pooled = arms, []
        cached = args.cache_ready
        for a in here:
            c = cache_for(a, cached)
            cached = cached or c is not None
            rows.append(run_arm(a, work, model, data, prompts, d, args, c, greedy))
        if pooled:
            if args.cache and not cached:
                raise SystemExit("--jobs: the first arm must write the feature cache (put eagle3 first)")
            with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), max_tasks_per_child=1) as ex:
                futs = [ex.submit(run_arm, a, work, model, data, prompts, d, args, cache_for(a, True), greedy)
                        for a in pooled]
                rows += [f.result() for f in futs]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = next(r for r in rows if r["arm"] == "eagle3")
    equal_tokens = len({r["train_tokens"] for r in rows}) == 1
    for r in rows:
        r["sim_tau_vs_eagle3"] = r["sim_tau"] / base["sim_tau"]
        if "tau" in r:
            r["tau_vs_eagle3"] = r["tau"] / base["tau"]
    cols = ["arm", "steps", "train_tokens", "sim_tau", "sim_tau_vs_eagle3", "exp_acc", "acc0"]
    cols += [] if args.no_real_tau else ["tau", "tau_vs_eagle3", "prompt_lookup_tau"]
    table = markdown_table(rows, cols + ["train_s", "train_cpu_s", "peak_rss_mb"])
    table += (f"\n\n{'Smoke size (tiny random target): pipeline proof only, not a quality result. ' if args.smoke else ''}"
              f"Equal training tokens in every arm: {'yes' if equal_tokens else 'NO'}. "
              f"K={d['K']}, {d['steps']} steps, held-out samples {d['holdout']}, eval prompts {d['eval_prompts']} "
              f"x {d['max_new_tokens']} tokens. Load average at start {load_start:.1f}. train_cpu_s: the trainer process's "
              f"CPU time (an embedded server's is not in it); peak_rss_mb: the trainer process's peak RSS (each arm "
              f"{'after the first ' if here else ''}runs in a fresh process).")
    name = args.name or ("bench_quality_smoke" if args.smoke else "bench_quality")
    write_results(name, {"config": d, "data": str(data), "set": args.set, "eval_dtype": args.eval_dtype, "arms": rows, "equal_tokens": equal_tokens, "smoke": args.smoke,
                         "load_avg_start": load_start}, table, args.out)
    if not equal_tokens and not args.minutes:
        raise SystemExit("bench_quality: arms trained on different token counts; the comparison is void")


if __name__ == "__main__":
    main()
