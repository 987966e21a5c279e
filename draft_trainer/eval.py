"""Acceptance evaluation by real speculative decoding (greedy chain drafting), checked lossless.

    draft-trainer eval --target-model DIR --draft EXPORT_DIR --prompts prompts.jsonl \
        [--num-steps 7] [--max-new-tokens 128] [--output result.json]

Legend (shapes): B = 1 (one prompt at a time), S tokens in a forward, H target hidden,
h draft hidden, K draft tokens per round.

The draft comes from its method (draft_trainer/methods: `DraftMethod.drafter`, chosen from the
export's config.json); the loop below is the same for every method. One round, with the
committed sequence x_0..x_n (x_n produced by the target, not yet in its KV cache):
  1. draft: the drafter proposes d_1..d_K (EAGLE-3: a chain from its last hidden output, see
     methods/eagle3/drafter.py);
  2. target: one forward over [x_n, d_1..d_K]; d_j is accepted while it equals the target's
     argmax at the previous position; the target's argmax after the last accepted token is the
     bonus token. a accepted + 1 bonus tokens are committed per target forward (tau = mean);
  3. caches: the target's DynamicCache is cropped to the committed tokens; the drafter gets the
     target's features of x_n, d_1..d_a (the layers it was trained on), exactly as at prefill.
The output is compared token by token with plain greedy decoding of the same target: any
difference is reported (and the command fails), so a bug cannot inflate tau.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.errors import ContractError, DataError
from draft_trainer.methods.base import Drafter


# ----------------------------------------------------------------------------- prompts

def load_prompts(path: str | Path, tokenizer) -> list[list[int]]:
    """JSONL: {"messages": [{"role":..,"content":..}, ...]} or {"prompt": "..."} per line.

    Both are rendered with the tokenizer's chat template (a plain prompt as one user turn) and
    the generation prompt; without a chat template a plain prompt is tokenized as is.
    """
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise DataError(f"cannot read prompts file {p}: {e}") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise DataError(f"{p}:{i}: not valid JSON ({e})") from None
        if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            msgs = rec["messages"]
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            msgs = [{"role": "user", "content": rec["prompt"]}]
        else:
            raise DataError(f'{p}:{i}: expected {{"messages": [...]}} or {{"prompt": "..."}}')
        if tokenizer.chat_template:
            try:
                ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
            except Exception as e:  # template errors are data errors here (bad roles etc.)
                raise DataError(f"{p}:{i}: chat template failed: {e}") from None
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        elif "prompt" in rec:
            ids = tokenizer(rec["prompt"], add_special_tokens=True)["input_ids"]
        else:
            raise DataError(f"{p}:{i}: chat messages need a tokenizer with a chat template")
        ids = list(ids[0] if ids and isinstance(ids[0], list) else ids)
        if not ids:
            raise DataError(f"{p}:{i}: prompt renders to no tokens")
        out.append(ids)
    if not out:
        raise DataError(f"prompts file {p} has no prompts")
    return out


# ----------------------------------------------------------------------------- decoding

@dataclass
class SpecStats:
    rounds: int = 0
    accepted: list[int] = field(default_factory=list)   # accepted draft tokens per round
    new_tokens: int = 0
    seconds: float = 0.0


def target_features(hidden_states, layer_ids, num_layers: int) -> torch.Tensor:
    """[1,S,L*H]: outputs of decoder layers `layer_ids` (hidden_states[0] is the embedding; the
    last entry is after the final norm, so the last layer's own output is not there)."""
    if max(layer_ids) >= num_layers - 1:
        raise ContractError(f"the evaluator reads layer outputs from transformers' hidden_states, which hold the "
                            f"last layer ({num_layers - 1}) only after the final norm; draft layers {list(layer_ids)}")
    return torch.cat([hidden_states[i + 1] for i in layer_ids], dim=-1)


def _eos_set(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


@torch.no_grad()
def greedy_decode(target, prompt: list[int], max_new_tokens: int, eos: set[int]) -> tuple[list[int], float]:
    """Plain greedy decoding with a KV cache: the reference output and speed."""
    from transformers import DynamicCache

    t0 = time.perf_counter()
    cache = DynamicCache()
    out = target(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
    toks = []
    nxt = int(out.logits[0, -1].argmax())
    while True:
        toks.append(nxt)
        if len(toks) >= max_new_tokens or nxt in eos:
            break
        out = target(torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
        nxt = int(out.logits[0, -1].argmax())
    return toks, time.perf_counter() - t0


@torch.no_grad()
def speculative_decode(target, drafter: Drafter, prompt: list[int], num_steps: int, max_new_tokens: int,
                       eos: set[int]) -> tuple[list[int], SpecStats]:
    """Greedy chain speculative decoding of `prompt` with any method's drafter (see the module doc)."""
    from transformers import DynamicCache

    layer_ids, L = list(drafter.layer_ids), target.config.num_hidden_layers
    st = SpecStats()
    t0 = time.perf_counter()
    tcache = DynamicCache()
    out = target(torch.tensor([prompt]), past_key_values=tcache, use_cache=True, output_hidden_states=True)
    x_n = int(out.logits[0, -1].argmax())
    toks = [x_n]
    # Draft prefill: position p reads f_p and x_{p+1}.
    drafter.start(target_features(out.hidden_states, layer_ids, L)[0], list(prompt[1:]) + [x_n])
    while len(toks) < max_new_tokens and toks[-1] not in eos:
        drafts = drafter.propose(num_steps)                     # 1. drafting
        k = len(drafts)
        # 2. one target forward verifies all drafts
        out = target(torch.tensor([[x_n] + drafts]), past_key_values=tcache, use_cache=True,
                     output_hidden_states=True)
        tgt = out.logits[0].argmax(-1).tolist()
        a = 0
        while a < k and drafts[a] == tgt[a]:
            a += 1
        bonus = tgt[a]
        st.rounds += 1
        st.accepted.append(a)
        new = drafts[:a] + [bonus]
        # 3. caches: keep x_n, d_1..d_a in the target; the drafter extends with their features.
        if a < k:                                   # drop the rejected drafts' entries
            tcache.crop(-(k - a))
        drafter.accept(target_features(out.hidden_states, layer_ids, L)[0, : a + 1], new)
        for t in new:
            toks.append(t)
            if len(toks) >= max_new_tokens or t in eos:
                break
        x_n = bonus
    st.seconds = time.perf_counter() - t0
    st.new_tokens = len(toks)
    return toks, st


# ----------------------------------------------------------------------------- command

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


def evaluate(target_model: str | Path, draft_dir: str | Path, prompts_path: str | Path, num_steps: int = 7,
             max_new_tokens: int = 128, *, greedy_cache: dict | None = None, progress: bool = False,
             force: bool = False) -> dict:
    """Acceptance of one exported draft on a prompts file (see the module doc).

    `greedy_cache` (a dict the caller keeps) holds the plain-greedy reference of each prompt, so
    evaluating several drafts on the same target and prompts decodes the reference once.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draft_trainer.methods import method_for_export

    if num_steps < 1 or max_new_tokens < 1:
        raise DataError("--num-steps and --max-new-tokens must be >= 1")
    config_path = Path(draft_dir) / "config.json"
    if not config_path.is_file():
        raise DataError(f"{draft_dir} is not an exported draft (no config.json); run draft-trainer export first")
    method = method_for_export(json.loads(config_path.read_text()))(None)
    tok = AutoTokenizer.from_pretrained(target_model)
    if not force:
        check_draft_target(Path(draft_dir), target_model, tok)
    target = AutoModelForCausalLM.from_pretrained(target_model, dtype=torch.float32).eval()
    make_drafter = lambda: method.drafter(Path(draft_dir), target, dtype=torch.float32)  # noqa: E731
    make_drafter()  # checks the draft against the target before any decoding
    prompts = load_prompts(prompts_path, tok)
    eos = _eos_set(target, tok)
    per_prompt, mismatches = [], []
    accepted, rounds, spec_s, greedy_s, spec_tokens, greedy_tokens = [], 0, 0.0, 0.0, 0, 0
    cache = greedy_cache if greedy_cache is not None else {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=f"eval {Path(draft_dir).name}", unit="prompt", dynamic_ncols=True)
    for i, prompt in enumerate(prompts):
        key = (str(target_model), tuple(prompt), max_new_tokens)
        if key not in cache:
            cache[key] = greedy_decode(target, prompt, max_new_tokens, eos)
        ref, g_s = cache[key]
        got, st = speculative_decode(target, make_drafter(), prompt, num_steps, max_new_tokens, eos)
        same = got == ref
        if not same:
            first = next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
            mismatches.append({"prompt": i, "first_diff": first, "spec": got[first:first + 5],
                               "greedy": ref[first:first + 5]})
        accepted += st.accepted
        rounds += st.rounds
        spec_s += st.seconds
        greedy_s += g_s
        spec_tokens += len(got)
        greedy_tokens += len(ref)
        per_prompt.append({"prompt_tokens": len(prompt), "new_tokens": len(got), "rounds": st.rounds,
                           "tau": (sum(st.accepted) + st.rounds) / max(st.rounds, 1), "identical": same})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(tau=f"{(sum(accepted) + rounds) / max(rounds, 1):.2f}")
    if bar is not None:
        bar.close()
    # Acceptance per draft position i: P(first i drafts accepted), and given the first i-1 were.
    reach = [sum(a >= i for a in accepted) for i in range(num_steps + 1)]
    result = {
        "target_model": str(target_model), "draft": str(draft_dir), "prompts": len(prompts),
        "num_steps": num_steps, "max_new_tokens": max_new_tokens, "decoding": "greedy, chain (top-1)",
        "tau": (sum(accepted) + rounds) / max(rounds, 1),
        "target_forwards": rounds,
        "accept_rate_per_position": [reach[i] / max(rounds, 1) for i in range(1, num_steps + 1)],
        "accepted_histogram": [sum(a == n for a in accepted) for n in range(num_steps + 1)],  # rounds by #accepted
        "cond_accept_rate_per_position": [reach[i] / max(reach[i - 1], 1) for i in range(1, num_steps + 1)],
        "spec_tokens_per_s": spec_tokens / max(spec_s, 1e-9),
        "greedy_tokens_per_s": greedy_tokens / max(greedy_s, 1e-9),
        "speedup": (spec_tokens / max(spec_s, 1e-9)) / max(greedy_tokens / max(greedy_s, 1e-9), 1e-9),
        "lossless": not mismatches,
        "mismatches": mismatches,
        "per_prompt": per_prompt,
    }
    return result
