"""SGLang <-> speculators layouts of an exported draft: exact round trips, per-engine layer ids,
refusals with reasons, and the `draft-trainer convert` command."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import ExportError
from draft_trainer.data.vocab import build_vocab_mapping
from draft_trainer.export import export_sglang
from draft_trainer.methods.eagle3.export import load_exported
from draft_trainer.formats import eagle3, layer_ids
from draft_trainer.formats.store import read_draft, to_sglang, to_speculators
from tests.support.drafts import save_checkpoint
from tests.support.engine_capture import sglang_captures, vllm_captures
from tests.support.procs import run_cli
from tests.support.eagle3 import random_draft, tiny_cfg

NUM_LAYERS = 30          # SmolLM2-135M's depth; its EAGLE-3 default aux ids are [1, 14, 26]


def make_export(tmp_path, **cfg_kw):
    """Our own export (the product path: checkpoint -> export_sglang), trained ids [1, 14, 26]."""
    cfg = tiny_cfg(**{"aux_layer_ids": [1, 14, 26], **cfg_kw})
    model = random_draft(cfg, dtype=torch.float32)
    vocab = build_vocab_mapping(torch.arange(cfg.vocab_size) % 11, cfg.draft_vocab_size)
    model.set_vocab_mapping(vocab.d2t, vocab.t2d)
    return model, export_sglang(save_checkpoint(model, vocab, tmp_path / "run", target_name="test-target"),
                                tmp_path / "sglang")


@pytest.fixture()
def exported(tmp_path):
    return make_export(tmp_path)   # draft width 32 != target width 24: both layouts must carry it


def _same_tensors(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_round_trip_sglang_speculators_sglang_is_identical(exported, tmp_path):
    model, src = exported
    spec = to_speculators(src, tmp_path / "spec")
    back = to_sglang(spec, tmp_path / "back")
    a, b = read_draft(src), read_draft(back)
    assert _same_tensors(a.tensors, b.tensors)
    # The only difference: the key our export leaves implicit is now written explicitly.
    added = {k: b.config[k] for k in set(b.config) - set(a.config)}
    assert added in ({}, {"norm_before_residual": False})
    assert {k: v for k, v in b.config.items() if k not in added} == a.config
    assert [f.name for f in b.other_files] == [f.name for f in a.other_files] == ["specrelay_export.json"]
    # From that canonical form on, both directions are exact.
    spec2 = to_speculators(back, tmp_path / "spec2")
    back2 = to_sglang(spec2, tmp_path / "back2")
    assert read_draft(back2).config == b.config and _same_tensors(read_draft(back2).tensors, b.tensors)
    assert read_draft(spec2).config == read_draft(spec).config
    assert _same_tensors(read_draft(spec2).tensors, read_draft(spec).tensors)
    # Our own loader reads the round-tripped draft into the same network.
    emb = model.embed_tokens.weight.detach()
    x, y = load_exported(src, embed_tokens_VH=emb), load_exported(back, embed_tokens_VH=emb)
    assert all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values()))


def test_speculators_layout(exported, tmp_path):
    model, src = exported
    d = read_draft(to_speculators(src, tmp_path / "spec", speculative_tokens=5))
    c = d.config
    assert c["speculators_model_type"] == "eagle3" and c["architectures"] == ["Eagle3Speculator"]
    assert c["norm_before_residual"] is False   # explicit: vLLM would read a missing key as true
    assert c["draft_vocab_size"] == model.cfg.draft_vocab_size
    assert c["target_hidden_size"] == model.cfg.target_hidden_size
    tl = c["transformer_layer_config"]
    assert tl["model_type"] == "llama" and tl["num_hidden_layers"] == 1 and tl["vocab_size"] == model.cfg.vocab_size
    assert tl["hidden_size"] == model.cfg.hidden_size and tl["head_dim"] == model.cfg.head_dim
    assert "eagle_config" not in tl and "architectures" not in tl
    sc = c["speculators_config"]
    assert sc["algorithm"] == "eagle3" and sc["proposal_methods"][0]["speculative_tokens"] == 5
    assert sc["default_proposal_method"] == sc["proposal_methods"][0]["proposal_type"] == "greedy"
    assert sc["verifier"]["name_or_path"] == "test-target"   # from the export's provenance
    assert not any(k.startswith("midlayer.") for k in d.tensors) and "embed_tokens.weight" not in d.tensors
    assert {k for k in d.tensors if k.startswith("layers.0.")} == {"layers.0." + s for s in eagle3.LAYER_SUFFIXES}
    src_t = read_draft(src).tensors
    assert torch.equal(d.tensors["layers.0.self_attn.q_proj.weight"], src_t["midlayer.self_attn.q_proj.weight"])


def test_each_engine_captures_the_trained_layers(exported, tmp_path):
    model, src = exported
    trained = list(model.cfg.aux_layer_ids)
    spec = to_speculators(src, tmp_path / "spec")
    sglang_cfg = read_draft(src).config
    spec_cfg = read_draft(spec).config
    assert sglang_captures(sglang_cfg, NUM_LAYERS) == trained
    assert vllm_captures(spec_cfg, NUM_LAYERS) == trained
    assert spec_cfg["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]   # vLLM's input-of-layer ids
    # The trap this format avoids: vLLM reading the SGLang layout is off by one layer.
    assert vllm_captures(sglang_cfg, NUM_LAYERS) == [i - 1 for i in trained]
    assert eagle3.trained_layer_ids(sglang_cfg) == eagle3.trained_layer_ids(spec_cfg) == trained


def test_absent_ids_mean_the_same_default_layers_in_both_engines(exported, tmp_path):
    _, src = exported
    f = read_draft(src)
    f.config["eagle_config"] = {"use_aux_hidden_state": True}   # a downloaded draft without ids
    spec_cfg, _ = eagle3.sglang_to_speculators(f.config, f.tensors)
    assert "eagle_aux_hidden_state_layer_ids" not in spec_cfg
    default = layer_ids.engine_default("sglang", NUM_LAYERS)
    assert default == [1, 14, 26] == layer_ids.engine_default("vllm", NUM_LAYERS)
    assert sglang_captures(f.config, NUM_LAYERS) == vllm_captures(spec_cfg, NUM_LAYERS) == default


def test_refuses_norm_before_residual_true_into_sglang(exported, tmp_path):
    _, src = exported
    d = read_draft(to_speculators(src, tmp_path / "spec"))
    d.config["norm_before_residual"] = True
    with pytest.raises(ExportError, match="norm_before_residual is true"):
        eagle3.speculators_to_sglang(d.config, d.tensors)
    del d.config["norm_before_residual"]
    with pytest.raises(ExportError, match="norm_before_residual is missing.*vLLM reads that as true"):
        eagle3.speculators_to_sglang(d.config, d.tensors)


@pytest.mark.parametrize("field", ["norm_before_fc", "fc_norm", "norm_output"])
def test_refuses_eagle31_norms_into_sglang(exported, tmp_path, field):
    _, src = exported
    d = read_draft(to_speculators(src, tmp_path / "spec"))
    d.config[field] = True
    with pytest.raises(ExportError, match=field):
        eagle3.speculators_to_sglang(d.config, d.tensors)


def test_refuses_ids_an_engine_cannot_capture(exported):
    _, src = exported
    f = read_draft(src)
    f.config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [26, 14, 1]
    with pytest.raises(ExportError, match="not distinct and ascending"):
        eagle3.sglang_to_speculators(f.config, f.tensors)
    f.config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [1, 14, NUM_LAYERS - 1]   # the last layer
    with pytest.raises(ExportError, match="cannot be captured by sglang"):
        eagle3.sglang_to_speculators(f.config, f.tensors, target_num_layers=NUM_LAYERS)
    spec_cfg, spec_t = eagle3.sglang_to_speculators(read_draft(src).config, f.tensors)
    spec_cfg["eagle_aux_hidden_state_layer_ids"] = [0, 14, 26]   # vLLM id 0 = the embedding output
    with pytest.raises(ExportError, match="embedding output"):
        eagle3.speculators_to_sglang(spec_cfg, spec_t)


def test_embed_tokens_only_when_exactly_the_targets(exported, tmp_path):
    model, src = exported
    f = read_draft(src)
    table = model.embed_tokens.weight.detach().clone()
    with_embed = {**f.tensors, "embed_tokens.weight": table}
    with pytest.raises(ExportError, match="--target-model"):
        eagle3.sglang_to_speculators(f.config, with_embed)
    _, out = eagle3.sglang_to_speculators(f.config, with_embed, target_embed_VH=table)
    assert "embed_tokens.weight" not in out        # the engines share the (identical) target table
    with pytest.raises(ExportError, match="differs from the target's"):
        eagle3.sglang_to_speculators(f.config, with_embed, target_embed_VH=table + 1e-3)


def test_refuses_unknown_or_missing_weights(exported):
    _, src = exported
    f = read_draft(src)
    with pytest.raises(ExportError, match=r"missing \['norm.weight'\]"):
        eagle3.sglang_to_speculators(f.config, {k: v for k, v in f.tensors.items() if k != "norm.weight"})
    with pytest.raises(ExportError, match=r"unexpected \['midlayer.extra.weight'\]"):
        eagle3.sglang_to_speculators(f.config, {**f.tensors, "midlayer.extra.weight": torch.zeros(1)})


def test_convert_command(exported, tmp_path):
    _, src = exported
    res = run_cli("draft_trainer", "convert", "--to", "speculators", "--input", str(src), "--output",
                  str(tmp_path / "spec"), timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"converted": str(tmp_path / "spec"),
                                                               "format": "speculators"}
    # Bad input: a clear error, exit 2, nothing written.
    c = json.loads((tmp_path / "spec" / "config.json").read_text())
    c["norm_before_residual"] = True
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(c))
    save_file(load_file(str(tmp_path / "spec" / "model.safetensors")), str(tmp_path / "bad" / "model.safetensors"))
    res = run_cli("draft_trainer", "convert", "--to", "sglang", "--input", str(tmp_path / "bad"), "--output",
                  str(tmp_path / "out"), timeout=300)
    assert res.returncode == 2 and "norm_before_residual is true" in res.stderr
    assert not (tmp_path / "out").exists()
    res = run_cli("draft_trainer", "convert", "--to", "speculators", "--input", str(tmp_path / "spec"), "--output",
                  str(tmp_path / "out"), timeout=300)
    assert res.returncode == 2 and "already in the speculators format" in res.stderr


def test_target_model_checks_depth_and_embedding(tmp_path):
    """--target-model: ids checked against the target's depth, a carried embed_tokens against its table."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from draft_trainer.formats.store import convert_dir, write_draft

    model, src = make_export(tmp_path, target_hidden_size=32)
    c = model.cfg

    def target(layers, name):
        t = LlamaForCausalLM(LlamaConfig(vocab_size=c.vocab_size, hidden_size=32, intermediate_size=16,
                                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1))
        t.save_pretrained(tmp_path / name)
        return t, tmp_path / name

    deep, deep_dir = target(NUM_LAYERS, "deep")
    _, shallow_dir = target(20, "shallow")            # layer 26 does not exist there
    with pytest.raises(ExportError, match=r"\[26\] cannot be captured by sglang on a 20-layer target"):
        convert_dir(src, tmp_path / "x", "speculators", target_model=shallow_dir)
    f = read_draft(src)
    table = deep.get_input_embeddings().weight.detach()
    write_draft(tmp_path / "with_embed", f.config, {**f.tensors, "embed_tokens.weight": table.to(torch.bfloat16)})
    with pytest.raises(ExportError, match="differs from the target's"):   # bf16-rounded: not exactly the table
        convert_dir(tmp_path / "with_embed", tmp_path / "y", "speculators", target_model=deep_dir)
    write_draft(tmp_path / "with_embed", f.config, {**f.tensors, "embed_tokens.weight": table}, overwrite=True)
    out = read_draft(convert_dir(tmp_path / "with_embed", tmp_path / "z", "speculators", target_model=deep_dir))
    assert "embed_tokens.weight" not in out.tensors
    assert out.config["speculators_config"]["verifier"] == {"name_or_path": str(deep_dir),
                                                           "architectures": ["LlamaForCausalLM"]}


def test_export_writes_the_speculators_layout_directly(tmp_path):
    """`draft-trainer export --format speculators` equals exporting for SGLang and converting."""
    from draft_trainer.export import export_draft
    from draft_trainer.formats.store import read_draft, to_speculators
    from tests.support.drafts import save_checkpoint
    from tests.support.eagle3 import random_draft, tiny_cfg

    from draft_trainer.data.vocab import build_vocab_mapping

    cfg = tiny_cfg()
    model = random_draft(cfg, dtype=torch.float32)
    vocab = build_vocab_mapping(torch.arange(cfg.vocab_size) % 7, cfg.draft_vocab_size)
    model.set_vocab_mapping(vocab.d2t, vocab.t2d)
    ckpt = save_checkpoint(model, vocab, tmp_path / "run")
    direct = read_draft(export_draft(ckpt, tmp_path / "spec", "speculators"))
    converted = read_draft(to_speculators(export_draft(ckpt, tmp_path / "sgl", "sglang"), tmp_path / "conv"))
    assert direct.format == "speculators" and direct.config == converted.config
    assert set(direct.tensors) == set(converted.tensors)
    assert all(torch.equal(direct.tensors[k], converted.tensors[k]) for k in direct.tensors)
