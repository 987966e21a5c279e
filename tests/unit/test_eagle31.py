"""EAGLE-3.1 (model.eagle_variant=3.1): a norm per aux layer before fc (`fc_norm`) and the normed
output fed to the next draft step (`norm_output`). The fused TTT equals the reference; training's
TTT equals what serving computes step by step; the export carries SGLang's keys and fields and
round-trips; the config names the field and its allowed values."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.config import load_config
from common.contract import ModelInfo
from common.errors import ConfigError, ExportError
from common.features import FeatureSpec
from draft_trainer.config import ModelConfig, TrainConfig
from draft_trainer.data.vocab import build_vocab_mapping
from draft_trainer.export import export_sglang
from draft_trainer.methods.eagle3.export import expected_shapes, load_exported
from draft_trainer.methods.eagle3.method import Eagle3Method
from draft_trainer.methods.eagle3.model import KVCache
from draft_trainer.methods.eagle3.ttt_fused import ttt_forward_fused
from draft_trainer.model.tensors import shift_left
from tests.support.drafts import save_checkpoint
from tests.support.eagle3 import padded_inputs, random_draft, tiny_cfg

V31 = dict(fc_norm=True, norm_output=True)


def test_fused_ttt_equals_reference_with_fc_norm_and_norm_output():
    cfg = tiny_cfg(**V31)
    model = random_draft(cfg)
    aux, ids, am = padded_inputs(cfg, [11, 7, 3])
    K = 4
    w = torch.randn(K, *ids.shape, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def run(fn):
        model.zero_grad(set_to_none=True)
        outs = fn(aux, ids, K, am)
        sum(((o * w[k]) * am[..., None]).sum() for k, o in enumerate(outs)).backward()
        return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_out, ref_g = run(model.ttt_forward)
    out, g = run(lambda *a: ttt_forward_fused(model, *a))
    real = am.bool()
    for k in range(K):
        torch.testing.assert_close(out[k][real], ref_out[k][real], rtol=1e-10, atol=1e-10)
    assert {"fc_norm.0.weight", "fc_norm.2.weight", "norm.weight"} <= ref_g.keys() == g.keys()
    for n in ref_g:
        torch.testing.assert_close(g[n], ref_g[n], rtol=1e-9, atol=1e-10, msg=n)


@pytest.mark.parametrize("variant", [{}, V31], ids=["eagle3", "eagle3.1"])
def test_ttt_step_one_is_what_serving_computes(variant):
    """TTT step 1 at position t = decoding one draft token after the target's features 0..t:
    the draft step reads `feed(g)` of step 0 (norm(g) with norm_output) at position t+1."""
    cfg = tiny_cfg(**variant)
    model = random_draft(cfg).eval()
    aux, ids, am = padded_inputs(cfg, [10])
    draft_ids = shift_left(ids, 1)
    with torch.no_grad():
        outs = model.ttt_forward(aux, draft_ids, 2, am)
        for t in (0, 4, 8):
            cache = KVCache()
            emb = model.embed_tokens(draft_ids[:, : t + 1])
            g0 = model.step(emb, model.project(aux[:, : t + 1]), torch.arange(t + 1)[None], cache)
            torch.testing.assert_close(g0[:, t], outs[0][:, t], rtol=1e-10, atol=1e-10)
            g1 = model.step(model.embed_tokens(draft_ids[:, t + 1 : t + 2]), model.feed(g0[:, t:]),
                            torch.tensor([[t + 1]]), cache)
            torch.testing.assert_close(g1[:, 0], outs[1][:, t], rtol=1e-10, atol=1e-10)


def test_variant_changes_the_draft():
    """Same weights, EAGLE-3 vs EAGLE-3.1 wiring: both norms change the outputs (the flag is used)."""
    aux, ids, am = padded_inputs(tiny_cfg(), [9])
    m3 = random_draft(tiny_cfg())
    m31 = random_draft(tiny_cfg(**V31))
    m31.load_state_dict(m3.state_dict(), strict=False)
    out_only = random_draft(tiny_cfg(norm_output=True))
    out_only.load_state_dict(m3.state_dict())
    with torch.no_grad():
        a, b, c = (m.ttt_forward(aux, ids, 2, am) for m in (m3, m31, out_only))
    assert not torch.allclose(a[0], b[0])                                  # fc_norm acts on step 0
    torch.testing.assert_close(a[0], c[0])                                  # norm_output does not...
    assert not torch.allclose(a[1], c[1])                                  # ...until the next step


def method_with(**model_kw):
    return Eagle3Method(ModelConfig(**model_kw))


def info_for(cfg):
    return ModelInfo(architecture="LlamaForCausalLM", model_type="llama", num_layers=4, hidden_size=cfg.hidden_size,
                     vocab_size=cfg.vocab_size, aux_layer_ids=[0, 1, 2], dtype="fp32", max_length=256,
                     tokenizer_fingerprint="", model_name="",
                     hf_config_json=json.dumps({"num_attention_heads": 4, "num_key_value_heads": 2,
                                                "intermediate_size": 48}))


def test_method_builds_the_variant_from_the_config():
    cfg = tiny_cfg(target_hidden_size=32)
    vocab = build_vocab_mapping(torch.arange(cfg.vocab_size) % 5, cfg.draft_vocab_size)
    spec = FeatureSpec(layer_ids=(0, 1, 2))
    m31 = method_with(eagle_variant="3.1").build_model(info_for(cfg), vocab, spec)
    m3 = method_with().build_model(info_for(cfg), vocab, spec)
    assert m31.cfg.fc_norm and m31.cfg.norm_output and len(m31.fc_norm) == 3
    assert not m3.cfg.fc_norm and not m3.cfg.norm_output and m3.fc_norm is None
    # The geometry travels with checkpoints (draft_config.json) and rebuilds the same variant.
    again = method_with().model_from_config(json.loads(json.dumps(m31.cfg.to_dict())))
    assert again.cfg.norm_output and set(again.state_dict()) == set(m31.state_dict())


def make_31_export(tmp_path):
    cfg = tiny_cfg(rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, **V31)
    model = random_draft(cfg, dtype=torch.float32)
    vocab = build_vocab_mapping(torch.arange(cfg.vocab_size) % 11, cfg.draft_vocab_size)
    model.set_vocab_mapping(vocab.d2t, vocab.t2d)
    out = export_sglang(save_checkpoint(model, vocab, tmp_path / "run"), tmp_path / "export")
    return model, out


def test_export_has_sglangs_31_keys_and_fields_and_round_trips(tmp_path):
    model, out = make_31_export(tmp_path)
    tensors = load_file(str(out / "model.safetensors"))
    H = model.cfg.target_hidden_size
    assert {f"fc_norm.{i}.weight" for i in range(3)} <= set(tensors) == set(expected_shapes(model.cfg))
    assert all(tuple(tensors[f"fc_norm.{i}.weight"].shape) == (H,) for i in range(3))
    c = json.loads((out / "config.json").read_text())
    assert c["fc_norm"] is True and c["norm_output"] is True and "norm_before_fc" not in c
    back = load_exported(out, embed_tokens_VH=model.embed_tokens.weight.detach())
    assert back.cfg.fc_norm and back.cfg.norm_output
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("embed_tokens"):
                p.copy_(p.to(torch.bfloat16).float())
        aux, ids, am = padded_inputs(model.cfg, [9, 5], dtype=torch.float32)
        want = [model.logits(g) for g in model.ttt_forward(aux, ids, 3, am)]
        got = [back.logits(g) for g in back.ttt_forward(aux, ids, 3, am)]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_export_without_the_31_norms_is_refused(tmp_path):
    _, out = make_31_export(tmp_path)
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["fc_norm.1.weight"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ExportError, match="fc_norm.1.weight"):
        load_exported(out)
    c = json.loads((out / "config.json").read_text())
    c["norm_before_fc"] = True
    (out / "config.json").write_text(json.dumps(c))
    with pytest.raises(ExportError, match="norm_before_fc"):
        load_exported(out)


def test_config_names_the_field_and_the_allowed_values():
    def load(*overrides):
        return load_config(TrainConfig, None, ["data.path=d", "targets.embedded_model=m", *overrides])

    cfg = load("model.eagle_variant=3.1", "model.loss=lk_lambda", "model.lk_eta=2")
    assert cfg.model.eagle_variant == "3.1" and cfg.model.loss == "lk_lambda" and cfg.model.lk_eta == 2.0
    assert load("model.eagle_variant=3").model.eagle_variant == "3"
    with pytest.raises(ConfigError, match=r"model.eagle_variant: '3.2' is not one of \['3', '3.1'\]"):
        load("model.eagle_variant=3.2")
    with pytest.raises(ConfigError, match=r"model.loss: 'lk' .* is not one of \['kl', 'lk_alpha', 'lk_lambda'\]"):
        load("model.loss=lk")
    with pytest.raises(ConfigError, match="model.lk_eta: must be > 0"):
        load("model.lk_eta=0")
    with pytest.raises(ConfigError, match="model.eagle_variant=3.1 is an EAGLE-3 variant"):
        ModelConfig(method="tests.support.toy_method:ToyMethod", eagle_variant="3.1").validate()
