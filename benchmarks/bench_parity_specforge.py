"""Quality parity with SpecForge (issue 20): the same cached features, the same batches in the same
order, the same schedule, trained by SpecRelay's EAGLE-3 objects and by SpecForge 0.2.0's own;
both drafts (and both starting points) exported in SGLang's format and evaluated by the same
lossless evaluator (draft_trainer.evaluate, what `draft-trainer eval` runs) on the same held-out
prompts.

    python -m benchmarks.bench_parity_specforge --smoke --out runs/parity-smoke           # tiny, ~1 min
    python -m benchmarks.bench_parity_specforge --data DATASET --feature-cache CACHE \\
        --tokens 300000 --specforge-venv VENV [--setup-specforge]

Stages:
  1. rows     per training sample: token ids, loss mask, the target's aux hidden states and its
              final hidden state (the lm_head input). From an offline feature cache of the dataset
              (`--feature-cache`, read only; the samples it holds) or computed here by the HF target
              (fp32, stored bf16 like the server's features; reused from <out> when inputs match);
  2. handoff  benchmarks/parity_handoff.py: rows, the step plan (seeded shuffles, `--batch-size`
              rows a step, until `--tokens` real tokens), the target's embedding and lm_head, the
              draft vocabulary (as the trainer chooses it: `--draft-vocab-size`, 0 = the dataset's
              vocab.json), the schedule (lr, linear warm-up, cosine
              to 0 over exactly the planned steps, grad clip, TTT steps) and the seed;
  3. train    each side in a fresh process (honest CPU time and peak RSS, `--threads` each):
              benchmarks/specrelay_parity_worker.py here, benchmarks/specforge_parity_worker.py with
              SpecForge's venv python (`--specforge-venv`, else $SPECFORGE_VENV, else
              <repo>/.venv-specforge; benchmarks/specforge_setup.sh makes it, `--setup-specforge`
              runs it). Both record the lr of every step; a mismatch fails the run;
  4. eval     initial and final draft of each side, one greedy cache (the plain-greedy reference and
              prompt lookup decoded once), K = `--num-steps`, fp32 target.
Reports per side: tau, untrained tau, tau gain, training tokens/s, tokens per CPU-second, peak RSS,
tau gain per CPU-minute; and the ratios SpecRelay / SpecForge (issue-20 targets: tau ratio >= 1.0,
gain per CPU-minute ratio >= 2.0). JSON + markdown under benchmarks/results/ (the --out directory
for --smoke).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.harness import REPO, markdown_table, write_results
from benchmarks.parity_checks import check_specforge_model, unseen_acceptance, unseen_rows
from benchmarks.parity_handoff import plan_order, save_handoff, warmup_steps

WORKERS = {"specrelay": REPO / "benchmarks" / "specrelay_parity_worker.py",
           "specforge": REPO / "benchmarks" / "specforge_parity_worker.py"}
SETUP = REPO / "benchmarks" / "specforge_setup.sh"


# ----------------------------------------------------------------------------- stage 1: rows

def rows_from_cache(cache_dir: Path, data: Path, max_samples: int):
    """Rows of the dataset samples an offline feature cache holds (dataset order), its frozen
    tensors and ModelInfo. The cache must be of this dataset's tokenizer and hold hidden teachers."""
    from common.errors import DataError
    from draft_trainer.data.dataset import TokenizedDataset
    from draft_trainer.data.feature_cache import FeatureCacheReader

    reader = FeatureCacheReader(cache_dir)
    ds = TokenizedDataset(data)
    want_fp = json.loads((Path(data) / "meta.json").read_text()).get("tokenizer_fingerprint")
    if want_fp and reader.info.tokenizer_fingerprint and want_fp != reader.info.tokenizer_fingerprint:
        raise DataError(f"feature cache {cache_dir} was written for another tokenizer than dataset {data}")
    if reader.schema.teacher != "hidden":
        raise DataError(f"feature cache {cache_dir} holds {reader.schema.teacher!r} teachers; the parity benchmark "
                        "needs the final hidden state (teacher=hidden) for both trainers")
    rows = []
    for i in range(len(ds)):
        if len(rows) >= max_samples:
            break
        sid, ids, mask = ds[i]
        f = reader.get(sid)
        if f is None:
            continue
        if f.length != len(ids):
            raise DataError(f"feature cache {cache_dir}: sample {sid} has {f.length} positions, the dataset "
                            f"{len(ids)} tokens: the cache is of another dataset")
        rows.append({"input_ids_T": torch.tensor(ids, dtype=torch.long),
                     "loss_mask_T": torch.tensor(mask, dtype=torch.float32),
                     "aux_T3H": f.aux_T3H.clone(), "teacher_TH": f.teacher_TH.clone()})
    if not rows:
        raise DataError(f"feature cache {cache_dir} holds none of the samples of dataset {data}")
    frozen = reader.frozen_tensors()
    return rows, {"embed_tokens": frozen["embed_tokens"], "lm_head": frozen["lm_head"]}, reader.info


def rows_from_target(model_dir: str, data: Path, max_samples: int, out: Path):
    """Rows computed by the HF target in fp32 (decoder-layer outputs of the aux layers and the
    final-norm output: what the server's hooks capture), stored bf16; cached under <out>."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from common.contract import ModelInfo, default_aux_layers
    from draft_trainer.data.dataset import TokenizedDataset

    ds = TokenizedDataset(data)
    samples = [ds[i] for i in range(min(len(ds), max_samples))]
    hf = AutoConfig.from_pretrained(model_dir)
    aux = default_aux_layers(hf.num_hidden_layers)
    info = ModelInfo(architecture=(hf.architectures or ["LlamaForCausalLM"])[0], model_type=hf.model_type,
                     num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, vocab_size=hf.vocab_size,
                     aux_layer_ids=aux, dtype="bfloat16", max_length=hf.max_position_embeddings,
                     tokenizer_fingerprint="", model_name=Path(model_dir).name, hf_config_json=hf.to_json_string())
    key = hashlib.sha256(json.dumps([str(model_dir), aux, [(int(s), list(map(int, i))) for s, i, _ in samples]])
                         .encode()).hexdigest()[:16]
    path = out / f"rows-{key}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return saved["rows"], saved["frozen"], info
    target = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    with torch.inference_mode():
        for _, ids, mask in samples:
            hs = target(torch.tensor(ids, dtype=torch.long)[None], output_hidden_states=True).hidden_states
            rows.append({"input_ids_T": torch.tensor(ids, dtype=torch.long),
                         "loss_mask_T": torch.tensor(mask, dtype=torch.float32),
                         "aux_T3H": torch.cat([hs[i + 1][0] for i in aux], -1).to(torch.bfloat16),
                         "teacher_TH": hs[-1][0].to(torch.bfloat16)})
    frozen = {"embed_tokens": target.get_input_embeddings().weight.detach().clone(),
              "lm_head": target.get_output_embeddings().weight.detach().clone()}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"rows": rows, "frozen": frozen}, tmp)
    os.replace(tmp, path)
    return rows, frozen, info


def draft_vocab(data: Path, rows: list[dict], vocab_size: int, draft_vocab_size: int):
    """The trainer's rule (`choose_vocab`): 0 = the dataset's pinned vocab.json; N = N tokens, the pinned
    file when it has that size, else the most frequent supervised tokens of these rows."""
    from draft_trainer.data.vocab import choose_vocab, count_supervised_tokens

    return choose_vocab(draft_vocab_size, Path(data) / "vocab.json", vocab_size, lambda: count_supervised_tokens(
        [r["input_ids_T"].numpy() for r in rows], [r["loss_mask_T"].numpy() for r in rows], vocab_size))


# ----------------------------------------------------------------------------- stage 3: train

def specforge_python(flag: str | None) -> Path:
    venv = flag or os.environ.get("SPECFORGE_VENV") or str(REPO / ".venv-specforge")
    return Path(venv) / "bin" / "python"


# Each side's malloc unless --malloc says otherwise: as each trainer ships. SpecRelay's CLI runs on jemalloc where
# the system has it (common/memory.py); SpecForge runs on glibc, and its step was 0.84x as fast on jemalloc
# (benchmarks/results/probe_parity_allocator_s14.json), so glibc is also its better one here.
DEFAULT_MALLOC = "specrelay=auto,specforge=glibc"


def parse_malloc(spec: str, sides: list[str]) -> dict[str, str]:
    """`SIDE=CHOICE,...` (CHOICE: common.memory.CHOICES) over the defaults; an unknown side or choice is an error."""
    from common.memory import CHOICES

    out = dict(kv.split("=", 1) for kv in DEFAULT_MALLOC.split(","))
    for kv in filter(None, (x.strip() for x in spec.split(","))):
        side, _, choice = kv.partition("=")
        if side not in WORKERS or choice not in CHOICES:
            raise ValueError(f"--malloc {kv!r}: use SIDE=CHOICE with SIDE in {', '.join(WORKERS)} and CHOICE in "
                             f"{', '.join(CHOICES)}, e.g. {DEFAULT_MALLOC}")
        out[side] = choice
    return {s: out.get(s, "auto") for s in sides}


def run_sides(sides: dict[str, list[str]], parallel: bool, timeout: float, threads: int, out: Path,
              malloc: dict[str, str] | None = None) -> dict:
    # torch.compile (SpecForge compiles its norms and teacher): compiled in the worker process, so its
    # CPU time counts, and into a fresh cache, so every run pays what a first run pays.
    import tempfile

    from common.memory import allocator_env

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads), TORCHINDUCTOR_COMPILE_THREADS="1",
               TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor-", dir=out))
    procs, results = {}, {}

    def finish(name, p, t0):
        try:
            out, err = p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            return {"error": f"timed out after {timeout:.0f}s"}
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            tail = [ln for ln in err.strip().splitlines() if ln.strip()][-3:] or ["no output"]
            return {"error": " | ".join(tail)[-800:]}
        return json.loads(lines[-1])

    for name, cmd in sides.items():
        t0 = time.perf_counter()
        side_env = allocator_env((malloc or {}).get(name, "auto"), env)
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                        env=side_env), t0)
        if not parallel:
            results[name] = finish(name, *procs[name])
            print(f"parity: {name} trained: {summary(results[name])}", flush=True)
    for name, (p, t0) in procs.items():
        if name not in results:
            results[name] = finish(name, p, t0)
            print(f"parity: {name} trained: {summary(results[name])}", flush=True)
    return results


def summary(r: dict) -> str:
    if "error" in r:
        return "error: " + r["error"]
    return (f"{r['steps']} steps, {r['tokens']} tokens, {r.get('allocator', '?')}, {r['tokens_per_s']:.1f} tok/s, "
            f"{r['tokens_per_cpu_s']:.1f} tok/CPU-s, loss {r['loss_first']:.3f} -> {r['loss_last10']:.3f}")


LR_TOLERANCE = 0.01  # of the peak lr; SpecForge's CosineAnnealingWarmupLR runs the cosine one step late
                    # (5.6e-3 of the peak at 23 steps, 1.2e-4 at 150, 7e-7 at 2,000; measured in its 0.2.0 wheel)


def check_lrs(results: dict, expected: list[float]) -> str | None:
    """Both sides must have stepped with the planned lr at every step (within LR_TOLERANCE of the
    peak); each side's largest deviation is recorded as `lr_max_dev_of_peak`."""
    peak = max(expected)
    for name, r in results.items():
        lrs = r.get("lrs")
        if lrs is None:
            continue
        if len(lrs) != len(expected):
            return f"{name} ran {len(lrs)} steps, planned {len(expected)}"
        devs = [abs(a - b) / peak for a, b in zip(lrs, expected)]
        i = max(range(len(devs)), key=devs.__getitem__)
        r["lr_max_dev_of_peak"] = devs[i]
        if devs[i] > LR_TOLERANCE:
            return f"{name}'s lr differs from the plan at step {i}: {lrs[i]} vs {expected[i]}"
    return None


# ----------------------------------------------------------------------------- stage 4: export + eval

def export_state(state_path: Path, cfg, out: Path) -> Path:
    from draft_trainer.data.vocab import VocabMapping
    from draft_trainer.export import TrainedDraft
    from draft_trainer.methods.eagle3.export import write_sglang

    saved = torch.load(state_path, weights_only=True)
    out.mkdir(parents=True, exist_ok=True)
    write_sglang(out, TrainedDraft(cfg=cfg, state=saved["state"],
                                   vocab=VocabMapping(used=saved["used"], vocab_size=cfg.vocab_size), path=state_path))
    return out


def evaluate_side(r: dict, cfg, model_dir: str, prompts: Path, out: Path, name: str, args, cache: dict) -> None:
    from draft_trainer.evaluate.runner import evaluate

    for which in ("init", "final"):
        t0 = time.perf_counter()
        d = export_state(Path(r[f"{which}_state"]), cfg, out / f"{name}-{which}-export")
        ev = evaluate(model_dir, d, prompts, num_steps=args.num_steps, max_new_tokens=args.max_new_tokens,
                      greedy_cache=cache, prompt_lookup=True)
        key = "tau" if which == "final" else "untrained_tau"
        r[key] = ev["tau"]
        r[f"{which}_lossless"] = ev["lossless"]
        if which == "final":
            r["accept_rate_per_position"] = ev["accept_rate_per_position"]
            r["prompt_lookup_tau"] = ev["prompt_lookup"]["tau"]
        r[f"eval_{which}_s"] = time.perf_counter() - t0
    r["tau_gain"] = r["tau"] - r["untrained_tau"]
    r["cpu_min"] = r["cpu_s"] / 60
    r["tau_gain_per_cpu_min"] = r["tau_gain"] / r["cpu_min"]


def by_quarter(ours: dict, theirs: dict) -> str:
    """One sentence: each side's tokens per CPU-second over the four quarters of its steps, and their
    ratio (the same batches in the same order on both sides)."""
    a, b = ours.get("tokens_per_cpu_s_by_quarter"), theirs.get("tokens_per_cpu_s_by_quarter")
    if not a or not b:
        return ""
    show = lambda xs: " / ".join(f"{x:.0f}" for x in xs)  # noqa: E731
    return (f" Tokens per CPU-second by quarter of the run: SpecRelay {show(a)}, SpecForge {show(b)} "
            f"(ratio {' / '.join(f'{x / y:.2f}' for x, y in zip(a, b))}).")


def ratio(a: dict, b: dict, key: str):
    if key in a and key in b and b[key]:
        return a[key] / b[key]
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a prepare-data dataset directory (its heldout_prompts.jsonl is evaluated)")
    p.add_argument("--feature-cache", help="an offline feature cache of --data (read only); default: compute features")
    p.add_argument("--target-model", help="default: cached SmolLM2-135M-Instruct (draft-trainer assets fetch)")
    p.add_argument("--tokens", type=int, default=300_000, help="real (attention-mask) training tokens per side")
    p.add_argument("--max-samples", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=2, help="samples per optimizer step (the demo recipe's)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak lr for both sides (the demo recipe's)")
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--grad-clip", type=float, default=0.5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ttt-steps", type=int, default=5, help="TTT steps in training (both sides)")
    p.add_argument("--betas", help="AdamW betas for both sides, e.g. 0.9,0.95 (default: each trainer's own: "
                   "SpecRelay 0.9,0.95, SpecForge 0.9,0.999)")
    p.add_argument("--holdout-rows", type=int, default=0, help="keep the last N samples out of training: the "
                   "teacher-forced acceptance is scored on unplanned rows (up to 100)")
    p.add_argument("--draft-vocab-size", type=int, default=0,
                   help="draft vocabulary size; 0 (default): the dataset's pinned vocab.json, as the trainer's "
                        "default data.draft_vocab_size=0 (the demo pins 8,192; prepare-data 32,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-steps", type=int, default=5, help="K in the evaluation")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--eval-prompts", type=int, default=0, help="evaluate only the first N held-out prompts (0: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each trainer and of the evaluation")
    p.add_argument("--parallel", action="store_true", help="train both sides at once (one core each on 2 cores); "
                   "CPU-time figures stay comparable, wall tokens/s then include the contention")
    p.add_argument("--specforge-venv", help="venv with specforge==0.2.0 (default: $SPECFORGE_VENV, else "
                   "<repo>/.venv-specforge)")
    p.add_argument("--specforge-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--setup-specforge", action="store_true", help="run benchmarks/specforge_setup.sh first (cached)")
    p.add_argument("--sides", default="specrelay,specforge")
    p.add_argument("--malloc", default=DEFAULT_MALLOC, help="each side's malloc, SIDE=auto|jemalloc|glibc (default: "
                   "each as it ships, SpecRelay on jemalloc where the system has it, SpecForge on glibc)")
    p.add_argument("--smoke", action="store_true", help="tiny model and data, seconds per side")
    p.add_argument("--out", help="work directory (features, handoff, states, exports)")
    p.add_argument("--name", default="parity_specforge")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="per training side, seconds")
    args = p.parse_args(argv)
    sf_python = specforge_python(args.specforge_venv)
    no_venv = (f"no SpecForge venv at {sf_python.parent.parent}: pass --specforge-venv DIR or set SPECFORGE_VENV, "
               "or add --setup-specforge to create it (cached)")
    if "specforge" in args.sides.split(",") and not (args.smoke or args.setup_specforge or sf_python.is_file()):
        # before any work: a full run whose SpecForge side is skipped has no ratio to report
        p.error(no_venv + ", or train one side with --sides specrelay")
    try:
        malloc = parse_malloc(args.malloc, args.sides.split(","))
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(args.threads)
    from draft_trainer.methods.eagle3.config import DraftConfig
    from draft_trainer.train.schedule import cosine_lr

    out = Path(args.out or "runs/parity-specforge" + ("-smoke" if args.smoke else "")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if args.smoke:
        from draft_trainer.assets import TINY_CHATS, build_tiny_dataset, build_tiny_model

        model_dir = str(build_tiny_model(out / "tiny-llama", "llama"))
        data = build_tiny_dataset(Path(model_dir), out / "tiny-data", num_samples=24) \
            if not (out / "tiny-data" / "meta.json").is_file() else out / "tiny-data"
        args.tokens, args.max_new_tokens, args.draft_vocab_size, args.batch_size = 4000, 12, 256, 2
        args.warmup_ratio, args.holdout_rows = 0.1, 4
        args.ttt_steps, args.num_steps, args.lr = 3, 3, 3e-3
        prompts = out / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q, _ in TINY_CHATS[:3]))
        rows, frozen, info = rows_from_target(model_dir, data, args.max_samples, out)
    else:
        if not args.data:
            p.error("--data DATASET_DIR is required (or --smoke)")
        from draft_trainer import assets

        model_dir = args.target_model or str(assets.fetch_smollm2(install=False))
        data = Path(args.data)
        prompts = data / "heldout_prompts.jsonl"
        if args.feature_cache:
            rows, frozen, info = rows_from_cache(Path(args.feature_cache), data, args.max_samples)
        else:
            rows, frozen, info = rows_from_target(model_dir, data, args.max_samples, out)
    if args.eval_prompts:
        lines = [ln for ln in prompts.read_text().splitlines() if ln.strip()][:args.eval_prompts]
        prompts = out / "eval_prompts.jsonl"
        prompts.write_text("\n".join(lines) + "\n")
    rows_s = time.perf_counter() - t_start
    vocab = draft_vocab(data, rows, info.vocab_size, args.draft_vocab_size)
    cfg = DraftConfig.from_model_info(info, vocab.draft_vocab_size)
    order = plan_order([r["input_ids_T"].numel() for r in rows], args.batch_size, args.tokens, args.seed,
                       holdout=args.holdout_rows)
    schedule = {"lr": args.lr, "warmup_steps": warmup_steps(len(order), args.warmup_ratio), "total_steps": len(order),
                "grad_clip": args.grad_clip, "weight_decay": args.weight_decay, "ttt_steps": args.ttt_steps,
                "batch_size": args.batch_size, "seed": args.seed, "min_lr_ratio": 0.0}
    handoff = save_handoff(out / "handoff.pt", rows=rows, order=order, frozen=frozen, used_Vd=vocab.used,
                           schedule=schedule, draft_config=cfg.to_dict(),
                           model_info=json.loads(json.dumps(asdict(info))))
    expected = [args.lr * cosine_lr(i, len(order), schedule["warmup_steps"], 0.0) for i in range(len(order))]
    print(f"parity: {len(rows)} samples, {len(order)} steps of {args.batch_size}, handoff {handoff} "
          f"({handoff.stat().st_size / 1e6:.0f} MB)", flush=True)

    results: dict[str, dict] = {}
    cmds = {}
    for side in args.sides.split(","):
        spec = {"handoff": str(handoff), "out": str(out), "threads": args.threads,
                "betas": [float(x) for x in args.betas.split(",")] if args.betas else None}
        if side == "specforge":
            if args.setup_specforge:
                subprocess.run(["bash", str(SETUP)], check=True, cwd=REPO,
                               env=dict(os.environ, SPECFORGE_VENV=str(sf_python.parent.parent)))
            if not sf_python.is_file():   # --smoke only (checked above): CI has no SpecForge venv
                results[side] = {"skipped": no_venv}
                continue
            spec["dtype"] = args.specforge_dtype
            cmds[side] = [str(sf_python), str(WORKERS[side]), "--spec", json.dumps(spec)]
        elif side == "specrelay":
            cmds[side] = [sys.executable, str(WORKERS[side]), "--spec", json.dumps(spec)]
        else:
            p.error(f"--sides: unknown side {side!r} (specrelay, specforge)")
    results.update(run_sides(cmds, args.parallel, args.timeout, args.threads, out, malloc))
    mismatch = check_lrs(results, expected)
    model_check = None
    shared = {"rows": rows, "order": order, "frozen": frozen}   # what the handoff holds, already in memory
    if "check_logits" in results.get("specforge", {}):
        model_check = check_specforge_model(results["specforge"], shared, cfg)
        print(f"parity: model check {model_check}", flush=True)
        if not model_check["ok"]:
            results["specforge"]["error"] = f"model check failed: {model_check}"
    cache: dict = {}
    held = None
    for name, r in results.items():
        if "error" in r or "skipped" in r or mismatch:
            continue
        try:
            evaluate_side(r, cfg, model_dir, prompts, out, name, args, cache)
        except Exception as e:  # noqa: BLE001 - reported in the results, the other side still evaluated
            r["error"] = f"export/eval: {type(e).__name__}: {e}"
        if "error" not in r:
            held = held if held is not None else unseen_rows(shared, args.num_steps)
            r["unseen_tf"] = {w: unseen_acceptance(held, frozen["embed_tokens"], r[f"{w}_state"], cfg, args.num_steps)
                              for w in ("init", "final")}
        print(f"parity: {name} tau {r.get('tau')} (untrained {r.get('untrained_tau')})", flush=True)
    ours, theirs = results.get("specrelay", {}), results.get("specforge", {})
    for r in results.values():
        tf = r.get("unseen_tf") or {}
        if tf.get("final") and tf.get("init"):
            r["tf_tau_unseen"] = tf["final"]["tau"]
            r["tf_gain_per_cpu_min"] = (tf["final"]["tau"] - tf["init"]["tau"]) / r["cpu_min"]
    ratios = {"tau": ratio(ours, theirs, "tau"), "tf_tau_unseen": ratio(ours, theirs, "tf_tau_unseen"), "tau_gain_per_cpu_min": ratio(ours, theirs, "tau_gain_per_cpu_min"),
              "tf_gain_per_cpu_min": ratio(ours, theirs, "tf_gain_per_cpu_min"),
              "tokens_per_cpu_s": ratio(ours, theirs, "tokens_per_cpu_s"),
              "peak_rss": ratio(ours, theirs, "peak_rss_mb")}
    targets = {"tau_ratio_ge_1": None if ratios["tau"] is None else ratios["tau"] >= 1.0,
               "gain_per_cpu_min_ratio_ge_2": None if ratios["tau_gain_per_cpu_min"] is None
               else ratios["tau_gain_per_cpu_min"] >= 2.0}
    cols = ["side", "malloc", "tau", "untrained tau", "tau gain", "tf tau unseen", "tokens", "tokens/s", "tokens/CPU-s",
            "CPU min", "tau gain / CPU-min", "peak RSS MB", "RSS after loading data MB", "loss first -> last10"]
    table_rows = []
    for name, r in results.items():
        if "error" in r or "skipped" in r:
            table_rows.append({"side": name, "tau": r.get("error") or r.get("skipped")})
            continue
        table_rows.append({"side": name, "malloc": r.get("allocator"), "tau": r.get("tau"),
                           "untrained tau": r.get("untrained_tau"),
                           "tau gain": r.get("tau_gain"), "tf tau unseen": r.get("tf_tau_unseen"),
                           "tokens": r["tokens"], "tokens/s": r["tokens_per_s"],
                           "tokens/CPU-s": r["tokens_per_cpu_s"], "CPU min": r["cpu_s"] / 60,
                           "tau gain / CPU-min": r.get("tau_gain_per_cpu_min"), "peak RSS MB": r["peak_rss_mb"],
                           "RSS after loading data MB": r["rss_after_load_mb"],
                           "loss first -> last10": f"{r['loss_first']:.3f} -> {r['loss_last10']:.3f}"})
    fmt = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in ratios.items()}
    md = markdown_table(table_rows, cols) + (
        f"\n\nSpecRelay / SpecForge: tau {fmt['tau']} (target >= 1.0; teacher-forced on unseen cached rows "
        f"{fmt['tf_tau_unseen']}), tau gain per CPU-minute "
        f"{fmt['tau_gain_per_cpu_min']} (target >= 2.0; teacher-forced {fmt['tf_gain_per_cpu_min']}), "
        f"tokens per CPU-second {fmt['tokens_per_cpu_s']}, "
        f"peak RSS {fmt['peak_rss']}.{by_quarter(ours, theirs)}\n\n{len(order)} steps x {args.batch_size} samples, lr {args.lr} (warm-up "
        f"{schedule['warmup_steps']} steps, cosine to 0), clip {args.grad_clip}, TTT {args.ttt_steps}; eval K="
        f"{args.num_steps}, {args.max_new_tokens} new tokens, prompts {prompts}; {args.threads} thread(s) per "
        f"process, sides {'in parallel' if args.parallel else 'one after the other'}."
        + (f"\n\nSCHEDULE MISMATCH: {mismatch}" if mismatch else ""))
    for r in results.values():
        r.pop("lrs", None)
    write_results(args.name + ("_smoke" if args.smoke else ""), {
        "config": {**{k: v for k, v in vars(args).items()}, "schedule": schedule, "samples": len(rows),
                   "steps": len(order), "draft_vocab_size": vocab.draft_vocab_size, "model": model_dir,
                   "prompts": str(prompts), "rows_s": rows_s, "total_s": time.perf_counter() - t_start,
                   "load_avg_end": os.getloadavg()},
        "results": results, "ratios_specrelay_over_specforge": ratios, "targets": targets,
        "specforge_model_check": model_check,
        "schedule_mismatch": mismatch}, md, out if args.smoke else None)
    failed = mismatch or any("error" in r for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
