"""vLLM (CPU build) serves the tiny target with our trained draft, exported the product way and
converted to the speculators layout, through `speculative_config` (method eagle3, greedy):

- its output equals plain greedy decoding of the target;
- its per-position acceptance equals `draft-trainer eval`'s (`draft_trainer.eval.evaluate`) on the
  same prompts (within one prompt's worth);
- the aux features its drafter receives are exactly the target layers our draft was trained on
  (HF `hidden_states[i + 1]` for our ids), read from inside the running engine.

The tiny target has head_dim 32: vLLM's CPU attention supports head sizes 32..512, not 16.
"""

from __future__ import annotations

import json

import pytest
import torch

from draft_trainer.assets import TINY_CHATS, build_tiny_model
from draft_trainer.eval import evaluate, greedy_decode, load_prompts, _eos_set
from draft_trainer.formats.store import to_speculators
from tests.sglang_lane.draft_support import export_via_checkpoint
from tests.support.drafts import one_thread, train_tiny_draft

K = 3              # num_speculative_tokens = our eval's --num-steps
MAX_NEW = 32
TRAIN_STEPS = 60


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-h128", "llama", hidden_size=128)


@pytest.fixture(scope="module")
def prompts_file(target, tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": q}) + "\n" for q, _ in TINY_CHATS[:4]))
    return p


@pytest.fixture(scope="module")
def prompts(target, prompts_file):
    from transformers import AutoTokenizer

    return load_prompts(prompts_file, AutoTokenizer.from_pretrained(target))   # what eval decodes


@pytest.fixture(scope="module")
def drafts(target, prompts, tmp_path_factory):
    """(sglang export, speculators conversion) of a draft trained briefly on these prompts' greedy
    continuations (so drafts are accepted and the comparison says something)."""
    with one_thread():
        draft, vocab = train_tiny_draft(target, prompts, steps=TRAIN_STEPS, max_new_tokens=MAX_NEW)
    out = tmp_path_factory.mktemp("draft")
    sglang_dir = export_via_checkpoint(draft, vocab, out)
    return sglang_dir, to_speculators(sglang_dir, out / "speculators", target_model=target, speculative_tokens=K)


def _metric(metrics, name):
    found = [m for m in metrics if m.name == name]
    assert found, f"vLLM reported no {name}"
    m = found[0]
    return list(m.values) if hasattr(m, "values") else m.value


@pytest.fixture(scope="module")
def served(target, drafts, prompts):
    """One vLLM engine: generate all prompts, read its speculative-decoding counters, then one
    prompt alone while recording what the drafter's fc receives."""
    from vllm import LLM, SamplingParams
    from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

    _, spec_dir = drafts
    seen: list[torch.Tensor] = []
    original = Eagle3LlamaForCausalLM.combine_hidden_states

    def recording(self, hidden_states):
        if record[0]:
            seen.append(hidden_states.detach().clone())
        return original(self, hidden_states)

    record = [False]
    Eagle3LlamaForCausalLM.combine_hidden_states = recording
    try:
        llm = LLM(model=str(target), dtype="float32", enforce_eager=True, max_model_len=512, max_num_batched_tokens=512, max_num_seqs=4,
                  enable_prefix_caching=False, seed=0, disable_log_stats=False,
                  speculative_config={"method": "eagle3", "model": str(spec_dir), "num_speculative_tokens": K})
        greedy = SamplingParams(temperature=0, max_tokens=MAX_NEW)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
        metrics = llm.get_metrics()
        counts = {"drafts": _metric(metrics, "vllm:spec_decode_num_drafts"),
                  "per_pos": _metric(metrics, "vllm:spec_decode_num_accepted_tokens_per_pos")}
        record[0] = True
        llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
        del llm
    finally:
        Eagle3LlamaForCausalLM.combine_hidden_states = original
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs], "counts": counts, "fc_inputs": seen}


def test_vllm_output_equals_greedy(served, target, prompts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    eos = _eos_set(model, AutoTokenizer.from_pretrained(target))
    with one_thread():
        ref = [greedy_decode(model, p, MAX_NEW, eos)[0] for p in prompts]
    assert served["tokens"] == ref


def test_vllm_acceptance_equals_eval(served, target, drafts, prompts_file):
    sglang_dir, _ = drafts
    with one_thread():
        res = evaluate(target, sglang_dir, prompts_file, num_steps=K, max_new_tokens=MAX_NEW)
    assert res["lossless"]
    ours_rounds = res["target_forwards"]
    hist = res["accepted_histogram"]                      # rounds by number of accepted drafts
    ours_per_pos = [sum(hist[i + 1:]) for i in range(K)]  # rounds whose draft i+1 was accepted
    vllm_rounds, vllm_per_pos = served["counts"]["drafts"], served["counts"]["per_pos"]
    print(f"per-position accepted: vllm {vllm_per_pos} / {vllm_rounds} rounds; eval {ours_per_pos} / "
          f"{ours_rounds} rounds; eval tau {res['tau']:.3f}")
    assert sum(ours_per_pos) >= len(res["per_prompt"]), ("the draft is hardly ever accepted", ours_per_pos)
    one_prompt = max(p["rounds"] for p in res["per_prompt"])
    assert abs(vllm_rounds - ours_rounds) <= one_prompt
    for v, o in zip(vllm_per_pos, ours_per_pos):
        assert abs(v - o) <= one_prompt, (vllm_per_pos, ours_per_pos)


def test_vllm_feeds_the_drafter_our_trained_layers(served, target, drafts, prompts):
    from transformers import AutoModelForCausalLM

    from draft_trainer.formats.store import read_draft

    ids = read_draft(drafts[0]).config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]   # trained ids
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    with torch.no_grad():
        hs = model(torch.tensor([prompts[0]]), output_hidden_states=True).hidden_states
    want_S3H = torch.cat([hs[i + 1][0] for i in ids], dim=-1)
    assert served["fc_inputs"], "vLLM's drafter was never called"
    got_S3H = served["fc_inputs"][0][: len(prompts[0])]          # the prefill of prompts[0]
    assert got_S3H.shape == want_S3H.shape
    torch.testing.assert_close(got_S3H, want_S3H, rtol=1e-4, atol=1e-4)
    # ... and not the neighbouring layers (the off-by-one this format avoids).
    wrong = torch.cat([hs[i][0] for i in ids], dim=-1)
    assert not torch.allclose(got_S3H, wrong, rtol=1e-2, atol=1e-2)


def test_vllm_loads_the_target_from_the_speculators_export(served, target, drafts, prompts):
    """`vllm serve DRAFT_DIR`: vLLM finds the target through `speculators_config.verifier`."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(drafts[1]), dtype="float32", enforce_eager=True, max_model_len=512, max_num_batched_tokens=512, max_num_seqs=1,
              enable_prefix_caching=False, seed=0)
    try:
        cfg = llm.llm_engine.vllm_config
        assert cfg.model_config.model == str(target)
        assert cfg.speculative_config.method == "eagle3" and cfg.speculative_config.num_speculative_tokens == K
        out = llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(temperature=0, max_tokens=MAX_NEW),
                           use_tqdm=False)
    finally:
        del llm
    assert list(out[0].outputs[0].token_ids) == served["tokens"][0]
