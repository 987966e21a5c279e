"""The speculative-decoding loop's own cost: plain greedy vs speculative decoding with a draft, side
by side in one process and thread setting, and where a round's time goes.

    python -m benchmarks.bench_spec_loop --draft EXPORT_DIR --prompts prompts.jsonl \
        [--target-model DIR] [--num-steps 5] [--width 1] [--dtype fp32] [--max-new-tokens 64] [--rounds 3] \
        [--threads 2] [--linears auto|torch|both] [--compare-rev GIT_REV] [--name NAME] [--out DIR]
    python -m benchmarks.bench_spec_loop --smoke --out runs/bench-smoke     # tiny model, random draft

Every round decodes every prompt with each variant, one after the other (so all see the same
machine load); tokens/s are per round and their median, ratios the median of per-round ratios:
  greedy          plain greedy decoding with a KV cache (the reference, `evaluate/decode.py`);
  spec            the evaluator's loop with the draft (lazy vocabulary projection; the drafter's fused
                  fp32 path, methods/eagle3/drafter.py);
  spec_model_path the same with the drafter decoding through the draft model's own methods, in --dtype
                  (the reference path; before/after of the fused path);
  spec_full_head  the same loop projecting all K+1 verified positions (ablation);
  prompt_lookup   the loop with n-gram prompt lookup (no draft);
  spec_rev        `--compare-rev`: draft_trainer/eval.py's loop as of that git revision (before/after).
The target's fp32 linears run prepacked for oneDNN as `draft-trainer eval` runs them (`--linears auto`,
common/cpu_linear.py); `--linears torch` keeps torch's own; `--linears both` adds, on a second copy of
the target with torch's linears, greedy_torch_linears and spec_torch_linears (before/after).
`--width W` > 1 verifies trees (K chain tokens, each with W - 1 alternatives) in the draft variants;
`--dtype bf16` runs the target in bf16 with the evaluator's row-wise attention (lossless in bf16).
All outputs are checked against greedy. The default target is SmolLM2-135M-Instruct from the
asset cache (`draft-trainer assets fetch`). Not part of `make bench`: it needs a trained draft.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import REPO, markdown_table, write_results


def _rev_loop(rev: str):
    """draft_trainer/eval.py at git revision `rev`, imported as a module (its speculative_decode)."""
    src = subprocess.run(["git", "show", f"{rev}:draft_trainer/eval.py"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="spec-rev-")) / "eval_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("eval_rev", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["eval_rev"] = mod
    spec.loader.exec_module(mod)
    return mod.speculative_decode


def _smoke_setup(out: Path, dtype: torch.dtype, attn: dict):
    from draft_trainer.assets import TINY_CHATS, build_tiny_model
    from draft_trainer.methods.eagle3.config import DraftConfig
    from draft_trainer.methods.eagle3.model import Eagle3Draft

    model_dir = build_tiny_model(out / "tiny-llama", "llama")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    target = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **attn).eval()
    c = target.config
    cfg = DraftConfig(hidden_size=c.hidden_size, target_hidden_size=c.hidden_size,
                      num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                      head_dim=c.hidden_size // c.num_attention_heads, intermediate_size=c.intermediate_size,
                      vocab_size=c.vocab_size, draft_vocab_size=c.vocab_size, aux_layer_ids=[0, 1, 2],
                      rope_parameters=dict(c.rope_parameters))
    torch.manual_seed(0)
    draft = Eagle3Draft(cfg).eval()
    draft.set_vocab_mapping(torch.zeros(c.vocab_size, dtype=torch.long), torch.ones(c.vocab_size, dtype=torch.bool))
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(target.get_input_embeddings().weight)
    prompts = [tok(q)["input_ids"] for q, _ in TINY_CHATS[:2]]
    return str(model_dir), tok, target, draft.to(dtype), prompts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target-model", help="HF target directory (default: cached SmolLM2-135M-Instruct)")
    p.add_argument("--draft", help="exported draft directory")
    p.add_argument("--prompts", help="prompts JSONL (as for draft-trainer eval)")
    p.add_argument("--num-steps", type=int, default=5)
    p.add_argument("--width", type=int, default=1, help="tree width: W - 1 alternatives per chain token (1: chains)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the target's and the draft's dtype")
    p.add_argument("--name", help="results file name (default spec_loop)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--linears", choices=["auto", "torch", "both"], default="auto",
                   help="the fp32 target's linears: prepacked for oneDNN (auto), torch's, or both side by side")
    p.add_argument("--compare-rev", help="also time draft_trainer/eval.py's loop at this git revision")
    p.add_argument("--smoke", action="store_true", help="tiny offline model and a random draft, seconds")
    p.add_argument("--out", help="results directory (default benchmarks/results)")
    args = p.parse_args(argv)
    from common.cpu_linear import prepack_linears
    from draft_trainer.evaluate import rowwise_attention
    from draft_trainer.evaluate.decode import SpecStats, TargetVerifier, eos_set, greedy_decode, speculative_decode
    from draft_trainer.methods.eagle3.drafter import Eagle3Drafter
    from draft_trainer.evaluate.prompt_lookup import PromptLookupDrafter

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.width < 1:
        p.error("--width must be >= 1")
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    # bf16 (and trees) verify through the evaluator's row-wise attention, as draft-trainer eval does
    attn = {"attn_implementation": rowwise_attention.register()} if args.dtype != "fp32" or args.width > 1 else {}
    if args.smoke:
        out = Path(args.out or tempfile.mkdtemp(prefix="bench-spec-loop-"))
        model_dir, tok, target, draft, prompts = _smoke_setup(out, tdtype, attn)
        args.rounds, args.max_new_tokens = min(args.rounds, 2), min(args.max_new_tokens, 8)
    else:
        if not args.draft or not args.prompts:
            p.error("--draft and --prompts are required (or --smoke)")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from draft_trainer import assets
        from draft_trainer.evaluate.prompts import load_prompts
        from draft_trainer.methods import method_for_export

        model_dir = args.target_model or str(assets.fetch_smollm2(install=False))
        tok = AutoTokenizer.from_pretrained(model_dir)
        target = AutoModelForCausalLM.from_pretrained(model_dir, dtype=tdtype, **attn).eval()
        method = method_for_export(json.loads((Path(args.draft) / "config.json").read_text()))(None)
        if method.name != "eagle3":
            p.error(f"--draft {args.draft} is a {method.name} draft; this benchmark times EAGLE-3 drafts "
                    "(draft-trainer eval times any method)")
        draft = method.drafter(Path(args.draft), target, dtype=tdtype).draft
        prompts = load_prompts(args.prompts, tok)
    eos = eos_set(target, tok)
    K, N = args.num_steps, args.max_new_tokens
    unpacked = None
    if args.linears == "both":   # a second copy keeps torch's linears (the before of before/after)
        import copy

        unpacked = copy.deepcopy(target)
    packed = prepack_linears(target) if args.linears != "torch" else 0
    layers = draft.cfg.aux_layer_ids
    W = args.width
    variants = {
        "spec": lambda pr: speculative_decode(target, Eagle3Drafter(draft), pr, K, N, eos, width=W),
        "spec_model_path": lambda pr: speculative_decode(target, Eagle3Drafter(draft, fast=False), pr, K, N, eos,
                                                         width=W),
        "spec_full_head": lambda pr: speculative_decode(target, Eagle3Drafter(draft), pr, K, N, eos, width=W,
                                                        verifier=TargetVerifier(target, layers, lazy_head=False)),
        "prompt_lookup": lambda pr: speculative_decode(target, PromptLookupDrafter(), pr, K, N, eos),
    }
    if unpacked is not None:
        def greedy_as_stats(pr):
            got, secs = greedy_decode(unpacked, pr, N, eos)
            return got, SpecStats(rounds=len(got), accepted=[0] * len(got), seconds=secs)

        variants["greedy_torch_linears"] = greedy_as_stats
        variants["spec_torch_linears"] = lambda pr: speculative_decode(unpacked, Eagle3Drafter(draft), pr, K, N, eos,
                                                                       width=W)
    if args.compare_rev:
        rev_decode = _rev_loop(args.compare_rev)
        variants["spec_rev"] = lambda pr: rev_decode(target, draft, pr, K, N, eos)
    load = [os.getloadavg()[0]]
    t_start = time.perf_counter()
    names = ["greedy", *variants]
    tps = {k: [] for k in names}
    split = {"drafter_s": 0.0, "target_s": 0.0, "seconds": 0.0, "rounds": 0}
    draft_ms = {k: [0.0, 0] for k in variants}    # drafter seconds and rounds, per variant
    taus, lossless = {}, True
    greedy_tok_s = []
    for r in range(args.rounds):
        secs = {k: 0.0 for k in names}
        toks = {k: 0 for k in names}
        acc = {k: [0, 0] for k in variants}
        for pr in prompts:
            ref, g_s = greedy_decode(target, pr, N, eos)
            secs["greedy"] += g_s
            toks["greedy"] += len(ref)
            for k, run in variants.items():
                got, st = run(pr)
                lossless &= got == ref
                secs[k] += st.seconds
                toks[k] += len(got)
                acc[k][0] += sum(st.accepted) + st.rounds
                acc[k][1] += st.rounds
                draft_ms[k][0] += st.draft_s
                draft_ms[k][1] += st.rounds
                if k == "spec":
                    split["drafter_s"] += st.draft_s
                    split["target_s"] += st.target_s
                    split["seconds"] += st.seconds
                    split["rounds"] += st.rounds
        for k in names:
            tps[k].append(toks[k] / max(secs[k], 1e-9))
        greedy_tok_s.append(secs["greedy"] / max(toks["greedy"], 1))
        taus = {k: a / max(n, 1) for k, (a, n) in acc.items()}
    load.append(os.getloadavg()[0])
    ratio = {k: statistics.median(tps[k][r] / tps["greedy"][r] for r in range(args.rounds)) for k in variants}
    ms_round = 1000 * split["seconds"] / max(split["rounds"], 1)
    ms_greedy = 1000 * statistics.median(greedy_tok_s)
    rows = [{"variant": k, "tau": taus.get(k, 1.0), "tokens/s (median)": statistics.median(tps[k]),
             "vs greedy (median of rounds)": ratio.get(k, 1.0),
             "drafter ms per round": 1000 * draft_ms[k][0] / max(draft_ms[k][1], 1) if k in variants else "",
             "tokens/s per round": ", ".join(f"{x:.1f}" for x in tps[k])} for k in names]
    data = {
        "config": {"target_model": model_dir, "draft": args.draft or "random (smoke)", "prompts": len(prompts),
                   "num_steps": K, "width": W, "dtype": args.dtype, "max_new_tokens": N, "rounds": args.rounds,
                   "torch_threads": torch.get_num_threads(), "linears": args.linears, "prepacked_layers": packed,
                   "compare_rev": args.compare_rev, "smoke": args.smoke},
        "load_avg_1m": load, "wall_s": time.perf_counter() - t_start, "lossless": lossless,
        "tokens_per_s": tps, "vs_greedy": ratio, "tau": taus,
        "spec_time_split": {**split, "ms_per_round": ms_round, "greedy_ms_per_token": ms_greedy,
                            "break_even_tau": ms_round / ms_greedy,
                            "loop_other_s": split["seconds"] - split["drafter_s"] - split["target_s"]},
        "rows": rows,
    }
    table = markdown_table(rows, list(rows[0]))
    table += (f"\n\nspec round: {ms_round:.1f} ms (drafter {1000 * split['drafter_s'] / max(split['rounds'], 1):.1f}, "
              f"target {1000 * split['target_s'] / max(split['rounds'], 1):.1f}); greedy token {ms_greedy:.1f} ms; "
              f"break-even tau {ms_round / ms_greedy:.2f}; load {load[0]:.1f} -> {load[1]:.1f}; lossless {lossless}")
    write_results(args.name or ("spec_loop" + ("_smoke" if args.smoke else "")), data, table,
                  Path(args.out) if args.out else None)
    if not lossless:
        print("bench_spec_loop: a speculative output differs from greedy decoding", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
