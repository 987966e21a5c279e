"""model.init=target: the draft starts as "one more target layer + final norm + lm_head" over the
last aux state. On a 4-layer target with aux layers [0, 1, 2], that extra layer is the target's
last one, so the initialised draft must reproduce the target's own logits (restricted to the
draft vocabulary) exactly, before any training."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.errors import ConfigError, ContractError
from draft_trainer.methods.eagle3.config import DraftConfig
from draft_trainer.methods.eagle3.model import Eagle3Draft, KVCache
from draft_trainer.methods.eagle3.init import init_draft, init_from_target, init_layer, target_tensor_names
from target_server.backends.hf import hf_model_info

AUX = [0, 1, 2]


def _target_and_draft(tiny_llama, Vd=300):
    target = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    cfg = target.config
    info = hf_model_info(cfg, AutoTokenizer.from_pretrained(tiny_llama), backend="hf", model_name="tiny",
                         num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
                         aux_layer_ids=AUX, dtype=torch.float32, max_length=256, max_topk=8, default_arch="x")
    torch.manual_seed(0)
    draft = Eagle3Draft(DraftConfig.from_model_info(info, Vd)).eval()
    used_Vd = torch.randperm(cfg.vocab_size)[:Vd].sort().values
    return target, draft, used_Vd


def _weights(target, layer):
    sd = target.state_dict()
    t = {"lm_head": sd["lm_head.weight"], "final_norm": sd["model.norm.weight"]}
    for n in target_tensor_names("target", layer)[1:]:
        t[n] = sd[f"model.{n}.weight"]
    return t


def test_initialised_draft_reproduces_the_target_last_layer(tiny_llama):
    target, draft, used_Vd = _target_and_draft(tiny_llama)
    layer = init_layer(AUX, target.config.num_hidden_layers)
    assert layer == 3
    # embed_std=0: the embedding half of q/k/v is silent, so the draft is exactly target layer 3.
    init_from_target(draft, _weights(target, layer), layer, used_Vd, embed_std=0.0)
    ids = torch.randint(0, target.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = target(ids, output_hidden_states=True)
        # hidden_states[i + 1] is the output of decoder layer i.
        aux_BT3H = torch.cat([out.hidden_states[i + 1] for i in AUX], dim=-1)
        g_BTh = draft.fc(aux_BT3H)
        emb_BTh = draft.embed_tokens(ids)  # random here: its half of q/k/v is zero
        g_BTh = draft.step(emb_BTh, g_BTh, torch.arange(12)[None], KVCache())
        got = draft.logits(g_BTh)
    torch.testing.assert_close(got, out.logits[..., used_Vd], rtol=1e-4, atol=1e-4)


def test_random_init_is_untouched_and_bad_inits_are_refused(tiny_llama):
    target, draft, used_Vd = _target_and_draft(tiny_llama)
    before = {k: v.clone() for k, v in draft.state_dict().items()}
    init_draft(draft, "random", 4, used_Vd, target.lm_head.weight, fetch=lambda names: pytest.fail("no fetch"))
    assert all(torch.equal(before[k], v) for k, v in draft.state_dict().items())
    with pytest.raises(ConfigError, match="model.init='warm'"):
        init_draft(draft, "warm", 4, used_Vd, target.lm_head.weight, fetch=lambda names: {})
    assert init_layer([1, 2], 4) == 3
    assert init_layer([1, 2, 3], 4) == 3   # the final layer's output is the last aux layer: start from layer 3
    with pytest.raises(ConfigError, match="aux layer 4 is past the target's 4 layers"):
        init_layer([1, 2, 4], 4)
    weights = _weights(target, 3)
    del weights["layers.3.mlp.up_proj"]
    with pytest.raises(ContractError, match=r"did not send \['layers.3.mlp.up_proj'\]"):
        init_from_target(draft, weights, 3, used_Vd)
    weights = _weights(target, 3)
    weights["final_norm"] = torch.ones(7)
    with pytest.raises(ContractError, match="final_norm has shape"):
        init_from_target(draft, weights, 3, used_Vd)
