"""`draft-trainer eval`: acceptance of an exported draft by real speculative decoding, checked
lossless, beside the baselines that say what it is worth.

On the same prompts, target and K, each drafter runs the lossless loop of decode.py:
  draft          the exported draft (the fields `tau`, `accept_rate_per_position`, ... are its);
  prompt_lookup  n-gram prompt lookup, no training at all (prompt_lookup.py): the free baseline;
  untrained      (when asked) a randomly initialised draft with the export's geometry and
                 vocabulary mapping: what training added.
Every output is compared token for token with plain greedy decoding of the target. In bf16 the
target attends row by row (rowwise_attention.py), so that a K+1-token verification computes each
position as a 1-token greedy step does: bit-exact in bf16 too, not only in fp32.
In fp32 the target's linear layers run with their weights prepacked for oneDNN (common/cpu_linear.py,
`linears`), greedy and speculative decoding alike: on a CPU torch's sgemm repacks every weight at each
few-row verification, which made a K+1-token verification cost ~1.6-2x a greedy token.

Speed: round 1 is the lossless pass; each further round (`speed_rounds`) decodes every prompt
again with plain greedy and with each drafter, one after the other in the same process and
threads, so that all see the same machine load. tokens/s are reported per round and as the
median over rounds; `speedup` is the median of the per-round ratios draft/greedy.
`time_split` divides the draft's speculative time into drafter, target and loop overhead, and
`break_even_tau` is the acceptance length at which this draft, at this K on this machine, would
match plain greedy decoding (the cost of one round over that of one greedy token).
`also_k` adds the same draft at other chain lengths (`by_k`): the K to serve with on this machine.
`also_confidence` adds it with dynamic chains (`by_confidence`): up to K tokens, stopping once the
draft's own confidence in the chain (product of its top-1 probabilities) falls below the value, so
a round verifies only what the draft believes in (on a CPU each verified token costs).
`also_tree` adds it as a tree (`by_tree`, "KxW": K chain tokens, each with up to W - 1
alternatives verified beside it, decode.py): the target then attends row by row in fp32 too.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cpu_linear import prepack_available, prepack_linears
from common.errors import ContractError, DataError
from common.hardware import pick_dtype
from draft_trainer.methods.base import Drafter
from draft_trainer.evaluate.decode import SpecStats, eos_set, greedy_decode, speculative_decode
from draft_trainer.evaluate.prompt_lookup import PromptLookupDrafter
from draft_trainer.evaluate.prompts import load_prompts
from draft_trainer.evaluate import rowwise_attention


EVAL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def acceptance(stats: list[SpecStats], num_steps: int) -> dict:
    """tau and per-position acceptance over all rounds of several decodes."""
    accepted = [a for st in stats for a in st.accepted]
    rounds = len(accepted)
    # Acceptance per draft position i: P(first i drafts accepted), and given the first i-1 were.
    reach = [sum(a >= i for a in accepted) for i in range(num_steps + 1)]
    return {
        "tau": (sum(accepted) + rounds) / max(rounds, 1),
        "target_forwards": rounds,
        "accept_rate_per_position": [reach[i] / max(rounds, 1) for i in range(1, num_steps + 1)],
        "accepted_histogram": [sum(a == n for a in accepted) for n in range(num_steps + 1)],  # rounds by #accepted
        "cond_accept_rate_per_position": [reach[i] / max(reach[i - 1], 1) for i in range(1, num_steps + 1)],
    }


def check_draft_target(draft_dir: Path, target_model: str | Path, tokenizer) -> None:
    """Refuse a draft exported for another target: the tokenizer fingerprint and the target's name
    recorded at export (specrelay_export.json) must match. Drafts of the same shape for another
    target would otherwise pass every shape check and simply not be accepted."""
    from common.contract import tokenizer_fingerprint

    prov_path = Path(draft_dir) / "specrelay_export.json"
    if not prov_path.is_file():
        return  # a draft from elsewhere: only its shapes can be checked
    prov = json.loads(prov_path.read_text())
    problems = []
    want_fp = prov.get("target_tokenizer_fingerprint")
    if want_fp and want_fp != tokenizer_fingerprint(tokenizer):
        problems.append(f"its tokenizer fingerprint is {want_fp[:12]}…, the target's is "
                        f"{tokenizer_fingerprint(tokenizer)[:12]}…")
    want_name, name = prov.get("target_model"), Path(target_model).resolve().name
    if want_name and want_name != name and not want_name.startswith("synthetic"):
        problems.append(f"it was trained against target {want_name!r}, this is {name!r}")
    if problems:
        raise ContractError(f"draft {draft_dir} was not trained for target {target_model}: " + "; ".join(problems)
                            + ". Pass --force to evaluate anyway")


@dataclass(frozen=True)
class _Run:
    """One decoding setting evaluated: a drafter, its chain length, confidence threshold and tree width."""
    drafter: Drafter
    k: int
    min_confidence: float = 0.0
    width: int = 1


def _proposed(stats: list[SpecStats]) -> float:
    """Draft tokens verified per round (a round verifies these + 1)."""
    return sum(sum(st.proposed) for st in stats) / max(sum(st.rounds for st in stats), 1)


def _tps(tokens: int, seconds: float) -> float:
    return tokens / max(seconds, 1e-9)


def evaluate(target_model: str | Path, draft_dir: str | Path, prompts_path: str | Path, num_steps: int = 7,
             max_new_tokens: int = 128, *, greedy_cache: dict | None = None, progress: bool = False,
             prompt_lookup: bool = True, untrained: bool = False, speed_rounds: int = 1, max_ngram: int = 3,
             min_ngram: int = 1, seed: int = 0, force: bool = False, dtype: str = "fp32",
             also_k: Sequence[int] = (), also_confidence: Sequence[float] = (),
             also_tree: Sequence[tuple[int, int]] = (), rowwise: bool | None = None,
             linears: str = "auto") -> dict:
    """Acceptance and speed of one exported draft and its baselines on a prompts file (module doc).

    `greedy_cache` (a dict the caller keeps) holds the plain-greedy reference of each prompt and
    the prompt-lookup decodes, so evaluating several drafts on the same target and prompts
    decodes those once (round 1; later rounds always re-time them beside the draft).
    `dtype` ("fp32", "bf16", or "auto": common.hardware.pick_dtype) is the target's and the draft's
    weights' (the EAGLE-3 drafter computes in fp32 from them, methods/eagle3/drafter.py). Both are
    checked token for token against greedy in the same dtype; bf16 (the dtype bf16 training features
    were computed in) runs the target with row-wise attention (module doc), without which a
    K+1-token verification rounds differently from 1-token greedy steps and near-ties flip.
    `also_k` runs the same draft at other chain lengths beside it (`by_k`: tau and speed per K): a
    round costs a K+1-token verification, so the K that is fastest on a machine can be shorter than
    the K the draft was trained and is scored at.
    `rowwise` True makes an fp32 target attend row by row even without a tree (None: only where
    bf16 or a tree needs it): evaluations that share `greedy_cache` with one verifying trees then
    share its greedy reference too, instead of decoding their own with transformers' attention.
    `linears` "auto" runs an fp32 target's linear layers through oneDNN with their weights packed once
    (common/cpu_linear.py: a K+1-token verification and the vocabulary head cost far less on a CPU),
    greedy and speculative decoding alike; "torch" keeps torch's own (the result's `linear_kernel`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draft_trainer.methods import method_for_export

    if dtype == "auto":
        dtype = pick_dtype(dtype)
    if dtype not in EVAL_DTYPES:
        raise DataError(f"eval dtype {dtype!r}: use one of {list(EVAL_DTYPES)} or auto")
    tdtype = EVAL_DTYPES[dtype]
    if num_steps < 1 or max_new_tokens < 1 or speed_rounds < 1:
        raise DataError("--num-steps, --max-new-tokens and --speed-rounds must be >= 1")
    also_k = sorted({int(k) for k in also_k} - {num_steps})
    if any(k < 1 for k in also_k):
        raise DataError(f"--also-k: chain lengths must be >= 1, got {also_k}")
    also_confidence = sorted({float(c) for c in also_confidence})
    if any(not 0 < c < 1 for c in also_confidence):
        raise DataError(f"--also-min-confidence: values must lie in (0, 1), got {also_confidence}")
    also_tree = sorted({(int(k), int(w)) for k, w in also_tree})
    if any(k < 1 or w < 2 for k, w in also_tree):
        raise DataError(f"--also-tree: KxW needs K >= 1 and W >= 2 (W = 1 is a chain: --also-k), got {also_tree}")
    if linears not in ("auto", "torch"):
        raise DataError(f"linears {linears!r}: use auto (oneDNN-prepacked fp32 linears) or torch")
    if not 1 <= min_ngram <= max_ngram:
        raise DataError(f"prompt lookup needs 1 <= min n-gram <= max n-gram, got {min_ngram}, {max_ngram}")
    config_path = Path(draft_dir) / "config.json"
    if not config_path.is_file():
        raise DataError(f"{draft_dir} is not an exported draft (no config.json); run draft-trainer export first")
    # The draft's method (from its export) makes the drafter; the loop is the same for all.
    method = method_for_export(json.loads(config_path.read_text()))(None)
    tok = AutoTokenizer.from_pretrained(target_model)
    if not force:
        check_draft_target(Path(draft_dir), target_model, tok)
    # fp32 keeps transformers' attention (its outputs have always matched greedy, and it is cheaper)
    # unless a tree is verified (tree rows need the row-wise attention's per-row paths) or `rowwise` asks
    if rowwise is False and (tdtype != torch.float32 or also_tree):
        raise DataError("rowwise=False: bf16 verification and trees need the target's row-wise attention")
    rowwise = rowwise or tdtype != torch.float32 or bool(also_tree)
    attn = {"attn_implementation": rowwise_attention.register()} if rowwise else {}
    # the greedy reference's key in greedy_cache: by dtype, and apart where fp32 attends row by row
    ref_kind = f"{dtype}+rowwise" if rowwise and tdtype == torch.float32 else dtype
    prepack = linears == "auto" and tdtype == torch.float32 and prepack_available()   # fp32 only: cpu_linear.py
    if prepack:
        ref_kind += "+prepacked"   # another kernel, another rounding: its own greedy reference
    target = AutoModelForCausalLM.from_pretrained(target_model, dtype=tdtype, **attn).eval()
    prompts = load_prompts(prompts_path, tok)
    eos = eos_set(target, tok)
    draft = method.drafter(Path(draft_dir), target, dtype=tdtype)
    # after the drafter took what it shares with the target; only fp32 (cpu_linear.py says why)
    packed = prepack_linears(target) if prepack else 0
    runs: dict[str, _Run] = {"draft": _Run(draft, num_steps)}
    if prompt_lookup:
        runs["prompt_lookup"] = _Run(PromptLookupDrafter(max_ngram, min_ngram), num_steps)
    if untrained:
        runs["untrained"] = _Run(method.drafter(Path(draft_dir), target, dtype=tdtype, untrained=True, seed=seed),
                                 num_steps)
    # the draft's other settings share its object: start() resets its state for every prompt
    runs.update({f"draft_k{k}": _Run(draft, k) for k in also_k})
    runs.update({f"draft_c{c:g}": _Run(draft, num_steps, min_confidence=c) for c in also_confidence})
    runs.update({f"draft_t{k}x{w}": _Run(draft, k, width=w) for k, w in also_tree})
    cache = greedy_cache if greedy_cache is not None else {}
    load_before = os.getloadavg()[0]

    stats = {k: [] for k in runs}                       # round 1: SpecStats per prompt
    secs = {k: [[] for _ in range(speed_rounds)] for k in ["greedy", *runs]}
    toks = {k: [[] for _ in range(speed_rounds)] for k in ["greedy", *runs]}
    refs, mismatches, per_prompt = [], [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts) * speed_rounds, desc=f"eval {Path(draft_dir).name}", unit="prompt",
                   dynamic_ncols=True)
    for r in range(speed_rounds):
        for i, prompt in enumerate(prompts):
            key = (str(target_model), ref_kind, tuple(prompt), max_new_tokens)
            if r == 0 and key in cache:
                ref, g_s = cache[key]
            else:
                ref, g_s = greedy_decode(target, prompt, max_new_tokens, eos)
                cache.setdefault(key, (ref, g_s))
            if r == 0:
                refs.append(ref)
            secs["greedy"][r].append(g_s)
            toks["greedy"][r].append(len(ref))
            for name, run in runs.items():
                pl_key = ("prompt_lookup", *key, num_steps, max_ngram, min_ngram)
                if r == 0 and name == "prompt_lookup" and pl_key in cache:
                    got, st = cache[pl_key]
                else:
                    got, st = speculative_decode(target, run.drafter, prompt, run.k, max_new_tokens, eos,
                                                 min_confidence=run.min_confidence, width=run.width)
                    if name == "prompt_lookup":
                        cache.setdefault(pl_key, (got, st))
                secs[name][r].append(st.seconds)
                toks[name][r].append(len(got))
                if got != refs[i]:
                    first = next((j for j, (a, b) in enumerate(zip(got, refs[i])) if a != b),
                                 min(len(got), len(refs[i])))
                    mismatches.append({"drafter": name, "round": r + 1, "prompt": i, "first_diff": first,
                                       "spec": got[first:first + 5], "greedy": refs[i][first:first + 5]})
                if r == 0:
                    stats[name].append(st)
                    if name == "draft":
                        per_prompt.append({"prompt_tokens": len(prompt), "new_tokens": len(got), "rounds": st.rounds,
                                           "tau": (sum(st.accepted) + st.rounds) / max(st.rounds, 1),
                                           "identical": got == ref})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(tau=f"{acceptance(stats['draft'], num_steps)['tau']:.2f}")
    if bar is not None:
        bar.close()

    tps = {k: [_tps(sum(toks[k][r]), sum(secs[k][r])) for r in range(speed_rounds)] for k in secs}
    ratio = {k: [tps[k][r] / max(tps["greedy"][r], 1e-9) for r in range(speed_rounds)] for k in runs}
    main = stats["draft"]
    rounds = sum(st.rounds for st in main)
    spec_s = sum(st.seconds for st in main)
    greedy_s_per_token = sum(secs["greedy"][0]) / max(sum(toks["greedy"][0]), 1)
    result = {
        "target_model": str(target_model), "dtype": dtype, "draft": str(draft_dir), "prompts": len(prompts),
        "attention": "rowwise" if rowwise else "transformers",
        "linear_kernel": f"oneDNN prepacked ({packed} layers)" if packed else "torch",
        "num_steps": num_steps, "max_new_tokens": max_new_tokens, "decoding": "greedy, chain (top-1)",
        **acceptance(main, num_steps),
        "spec_tokens_per_s": statistics.median(tps["draft"]),
        "greedy_tokens_per_s": statistics.median(tps["greedy"]),
        "speedup": statistics.median(ratio["draft"]),
        "lossless": not mismatches,
        "mismatches": mismatches,
        "per_prompt": per_prompt,
        "speed": {"rounds": speed_rounds, "torch_threads": torch.get_num_threads(),
                  "load_avg_1m": [load_before, os.getloadavg()[0]],
                  **{f"{k}_tokens_per_s": v for k, v in tps.items()}},
        "time_split": {   # the draft's round-1 speculative decoding, all prompts
            "seconds": spec_s, "drafter_s": sum(st.draft_s for st in main),
            "target_s": sum(st.target_s for st in main),
            "loop_other_s": spec_s - sum(st.draft_s + st.target_s for st in main),
            "ms_per_round": 1000 * spec_s / max(rounds, 1),
            "greedy_ms_per_token": 1000 * greedy_s_per_token,
            "break_even_tau": (spec_s / max(rounds, 1)) / max(greedy_s_per_token, 1e-12),
        },
    }
    def variant(name: str, k: int) -> dict:   # one drafter run's figures (a chain length, a threshold)
        return {"tau": acceptance(stats[name], k)["tau"], "spec_tokens_per_s": statistics.median(tps[name]),
                "speedup": statistics.median(ratio[name]),
                "lossless": not any(m["drafter"] == name for m in mismatches)}

    if also_k:
        result["by_k"] = {str(k): variant(name, k)
                          for k, name in sorted([(num_steps, "draft")] + [(k, f"draft_k{k}") for k in also_k])}
    if also_confidence:
        result["by_confidence"] = {f"{c:g}": {**variant(f"draft_c{c:g}", num_steps),
                                              "proposed_per_round": _proposed(stats[f"draft_c{c:g}"])}
                                   for c in also_confidence}
    if also_tree:
        result["by_tree"] = {f"{k}x{w}": {**variant(f"draft_t{k}x{w}", k),
                                          "verified_per_round": 1 + _proposed(stats[f"draft_t{k}x{w}"])}
                             for k, w in also_tree}
    for name in runs:
        if name == "draft" or name.startswith(("draft_k", "draft_c", "draft_t")):
            continue
        result[name] = {**acceptance(stats[name], num_steps), **variant(name, num_steps),
                        "proposed_per_round": _proposed(stats[name])}
    if prompt_lookup:
        result["prompt_lookup"].update(max_ngram=max_ngram, min_ngram=min_ngram)
    if untrained:
        result["untrained"].update(seed=seed, init="random (same geometry and vocabulary mapping)")
    return result
