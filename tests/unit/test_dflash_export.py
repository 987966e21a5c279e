"""DFlash export layouts, checked against what the readers read (written out here from their
sources, not from our export code):
  SGLang 0.5.23 srt/models/dflash.py `DFlashDraftModel.__init__`/`load_weights` and
  srt/speculators/dflash_utils.py `parse_dflash_draft_config`; vllm-project/speculators
  src/speculators/models/dflash/config.py (`DFlashSpeculatorConfig`)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from common.errors import ExportError
from draft_trainer.methods.dflash.config import DFlashConfig
from draft_trainer.methods.dflash.export import config_from_export, load_exported, write_sglang, write_speculators
from draft_trainer.methods.dflash.model import DFlashDraft

H, n, g, d, I, L = 32, 4, 2, 8, 48, 2


def _model() -> DFlashDraft:
    cfg = DFlashConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=n, num_key_value_heads=g, head_dim=d,
                       intermediate_size=I, vocab_size=100, draft_vocab_size=40, target_layer_ids=[1, 4, 7],
                       num_target_layers=12, block_size=8, mask_token_id=5)
    return DFlashDraft(cfg)


def _sglang_keys() -> dict[str, tuple]:
    """The checkpoint names SGLang's DFLASH loader maps onto its parameters (q/k/v -> qkv_proj,
    gate/up -> gate_up_proj; fc.weight is [H, K*H] with K = len(target_layer_ids))."""
    keys = {"fc.weight": (H, 3 * H), "hidden_norm.weight": (H,), "norm.weight": (H,)}
    for i in range(L):
        a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        keys.update({f"layers.{i}.input_layernorm.weight": (H,), f"layers.{i}.post_attention_layernorm.weight": (H,),
                     a + "q_proj.weight": (n * d, H), a + "k_proj.weight": (g * d, H), a + "v_proj.weight": (g * d, H),
                     a + "o_proj.weight": (H, n * d), a + "q_norm.weight": (d,), a + "k_norm.weight": (d,),
                     m + "gate_proj.weight": (I, H), m + "up_proj.weight": (I, H), m + "down_proj.weight": (H, I)})
    return keys


def test_sglang_export_has_exactly_the_keys_shapes_and_fields_sglang_reads(tmp_path):
    m = _model()
    write_sglang(tmp_path, m.cfg, m.state_dict())
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    assert got == _sglang_keys()      # no embed_tokens / lm_head / d2t: SGLang borrows the target's
    c = json.loads((tmp_path / "config.json").read_text())
    assert c["architectures"] == ["DFlashDraftModel"]
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"],
            c["head_dim"], c["intermediate_size"], c["vocab_size"]) == (H, L, n, g, d, I, 100)
    assert c["hidden_act"] == "silu" and c["attention_bias"] is False and c["rms_norm_eps"] == 1e-6
    assert c["dflash_config"] == {"block_size": 8, "target_layer_ids": [1, 4, 7], "mask_token_id": 5}
    assert "layer_types" not in c and "is_causal" not in c    # full, non-causal attention in every layer
    assert isinstance(c["rope_theta"], float) and c["max_position_embeddings"] > 0


def test_export_refuses_a_wrong_shape_and_round_trips(tmp_path):
    m = _model()
    state = dict(m.state_dict())
    state["fc.weight"] = torch.zeros(H, 2 * H)
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ExportError, match="fc.weight"):
        write_sglang(bad, m.cfg, state)
    assert not list(bad.iterdir())     # checked before anything is written
    write_sglang(tmp_path, m.cfg, m.state_dict())
    back = load_exported(tmp_path)
    for k, v in m.state_dict().items():
        if k not in ("d2t", "t2d"):
            assert torch.equal(back.state_dict()[k], v.to(torch.bfloat16).float()), k


def test_speculators_layout(tmp_path):
    m = _model()
    write_speculators(tmp_path, m.cfg, m.state_dict(), {"model_name": "tiny", "architecture": "LlamaForCausalLM"})
    c = json.loads((tmp_path / "config.json").read_text())
    assert c["speculators_model_type"] == "dflash" and c["architectures"] == ["DFlashSpeculator"]
    assert c["aux_hidden_state_layer_ids"] == [1, 4, 7] and c["block_size"] == 8 and c["mask_token_id"] == 5
    assert c["transformer_layer_config"]["num_hidden_layers"] == L
    assert c["draft_vocab_size"] == c["transformer_layer_config"]["vocab_size"] == 100  # full vocab: no lm_head
    assert c["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 7
    assert c["speculators_config"]["verifier"]["architectures"] == ["LlamaForCausalLM"]
    # A speculators checkpoint without our own block reads back to the same geometry.
    c.pop("specrelay")
    back = config_from_export(c)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "intermediate_size", "vocab_size", "target_layer_ids", "block_size", "mask_token_id", "rope_theta"):
        assert getattr(back, field) == getattr(m.cfg, field), field


def test_init_from_target_copies_the_reading_layers():
    from draft_trainer.methods.dflash.init import init_from_target, tensor_names

    m = _model()
    g = torch.Generator().manual_seed(0)
    shapes = {"input_layernorm": (H,), "post_attention_layernorm": (H,), "self_attn.q_proj": (n * d, H),
              "self_attn.k_proj": (g_ := 2 * d, H), "self_attn.v_proj": (g_, H), "self_attn.o_proj": (H, n * d),
              "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}
    target = {"final_norm": torch.randn(H, generator=g)}
    for src in (2, 5, 8):      # target_layer_ids [1, 4, 7] -> the layers that read them
        for s, shape in shapes.items():
            target[f"layers.{src}.{s}"] = torch.randn(*shape, generator=g)
    assert set(tensor_names(m, 12)) == set(target)
    init_from_target(m, target, 12)
    assert torch.equal(m.layers[1].self_attn.q_proj.weight, target["layers.5.self_attn.q_proj"])
    assert torch.equal(m.layers[0].mlp.down_proj.weight, target["layers.2.mlp.down_proj"])
    assert torch.equal(m.norm.weight, target["final_norm"])
    with pytest.raises(Exception, match="did not send"):
        init_from_target(m, {"final_norm": target["final_norm"]}, 12)
