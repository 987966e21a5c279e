"""Export to SGLang's EAGLE-3 format: exact keys/dtypes/config, refusals, atomicity, round trip."""

import json

import pytest
import torch
from safetensors.torch import load_file

from common.errors import ContractError, ExportError
from draft_trainer.data.vocab import build_vocab_mapping
from draft_trainer.export import export_sglang, load_trained_draft
from draft_trainer.methods.eagle3.export import expected_shapes, load_exported, serving_tensors
from tests.support.drafts import save_checkpoint
from tests.support.procs import run_cli
from tests.support.eagle3 import padded_inputs, random_draft, tiny_cfg

SERVING_KEYS = {
    "fc.weight", "midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight",
    "midlayer.post_attention_layernorm.weight", "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight",
    "norm.weight", "lm_head.weight", "d2t", "t2d",
}


def make_ckpt(tmp_path, **cfg_kw):
    cfg = tiny_cfg(rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, **cfg_kw)
    model = random_draft(cfg, dtype=torch.float32)
    vocab = build_vocab_mapping(torch.arange(cfg.vocab_size) % 11, cfg.draft_vocab_size)
    model.set_vocab_mapping(vocab.d2t, vocab.t2d)
    return model, vocab, save_checkpoint(model, vocab, tmp_path / "run")


def test_export_format_is_exactly_sglangs(tmp_path):
    model, vocab, ckpt = make_ckpt(tmp_path)
    out = export_sglang(ckpt, tmp_path / "export")
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == SERVING_KEYS == set(expected_shapes(model.cfg))
    assert all(tensors[k].dtype == torch.bfloat16 for k in SERVING_KEYS - {"d2t", "t2d"})
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert torch.equal(tensors["d2t"] + torch.arange(vocab.draft_vocab_size), vocab.used)   # SGLang's hot_token_id
    assert int(tensors["t2d"].sum()) == vocab.draft_vocab_size
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["LlamaForCausalLMEagle3"] and c["model_type"] == "llama"
    assert c["num_hidden_layers"] == 1 and c["tie_word_embeddings"] is False
    assert c["vocab_size"] == model.cfg.vocab_size and c["draft_vocab_size"] == model.cfg.draft_vocab_size
    assert c["target_hidden_size"] == model.cfg.target_hidden_size and c["head_dim"] == model.cfg.head_dim
    assert c["rope_theta"] == 50000.0 and c["rope_parameters"]["rope_theta"] == 50000.0
    assert c["rope_parameters"]["rope_type"] == "default" and c["rope_scaling"] is None
    assert c["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [0, 1, 2], "use_aux_hidden_state": True}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")]   # no temp left behind


def test_round_trip_same_logits(tmp_path):
    model, vocab, ckpt = make_ckpt(tmp_path)
    out = export_sglang(ckpt, tmp_path / "export")
    back = load_exported(out, embed_tokens_VH=model.embed_tokens.weight.detach())
    # The export is bf16: compare with the original rounded to bf16 (same numbers SGLang gets).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("embed_tokens"):   # the embedding comes from the target, unrounded
                p.copy_(p.to(torch.bfloat16).float())
    aux, ids, am = padded_inputs(model.cfg, [9, 5], dtype=torch.float32)
    with torch.no_grad():
        want = [model.logits(g) for g in model.ttt_forward(aux, ids, 3, am)]
        got = [back.logits(g) for g in back.ttt_forward(aux, ids, 3, am)]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(back.d2t, model.d2t) and torch.equal(back.t2d, model.t2d)


def test_refuses_missing_extra_and_misshaped_keys(tmp_path):
    model, vocab, ckpt = make_ckpt(tmp_path)
    td = load_trained_draft(ckpt)
    state = dict(td.state)
    for mutate, msg in [
        (lambda s: s.pop("midlayer.hidden_norm.weight"), "missing keys ['midlayer.hidden_norm.weight']"),
        (lambda s: s.__setitem__("model.fc.weight", s["fc.weight"]), "unexpected keys ['model.fc.weight']"),
        (lambda s: s.__setitem__("lm_head.weight", s["lm_head.weight"][:-1]), "wrong shapes"),
        (lambda s: s.__setitem__("norm.weight", s["norm.weight"] * float("nan")), "non-finite"),
    ]:
        td.state = dict(state)
        mutate(td.state)
        with pytest.raises(ExportError, match=r".*" + msg.replace("[", r"\[").replace("]", r"\]")):
            serving_tensors(td)
    # A checkpoint whose stored tensors do not fit its draft_config.json cannot be read at all.
    cfg = json.loads((ckpt / "draft_config.json").read_text())
    (ckpt / "draft_config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] * 2}))
    with pytest.raises(ExportError, match="cannot read checkpoint"):
        export_sglang(ckpt, tmp_path / "out-bad")
    assert not (tmp_path / "out-bad").exists()
    (ckpt / "draft_config.json").write_text(json.dumps(cfg))
    export_sglang(ckpt, tmp_path / "ok")


def test_refuses_inconsistent_vocab_mapping(tmp_path):
    model, vocab, ckpt = make_ckpt(tmp_path)
    other = build_vocab_mapping(torch.arange(model.cfg.vocab_size) % 5, model.cfg.draft_vocab_size)
    assert not torch.equal(other.used, vocab.used)
    other.save(ckpt / "vocab.json")                       # pinned mapping differs from the trained buffers
    with pytest.raises(ExportError, match="vocabulary mismatch"):
        export_sglang(ckpt, tmp_path / "out")
    vocab.save(ckpt / "vocab.json")
    td = load_trained_draft(ckpt)
    t2d = td.state["t2d"].clone()
    t2d[int(torch.nonzero(~t2d)[0])] = True               # t2d marks one id d2t does not map
    td.state = {**td.state, "t2d": t2d}
    with pytest.raises(ExportError, match="t2d marks"):
        serving_tensors(td)


def test_resume_check_rejects_a_different_run_mapping(tmp_path):
    model, vocab, ckpt = make_ckpt(tmp_path)
    assert load_trained_draft(ckpt, expected_vocab=vocab).vocab.fingerprint() == vocab.fingerprint()
    other = build_vocab_mapping(torch.arange(model.cfg.vocab_size) % 5, model.cfg.draft_vocab_size)
    with pytest.raises(ContractError, match="vocabulary mismatch"):
        load_trained_draft(ckpt, expected_vocab=other)


def test_cli_export_and_clear_errors(tmp_path):
    model, vocab, ckpt = make_ckpt(tmp_path)
    res = run_cli("draft_trainer", "export", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "e"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "e" / "model.safetensors").is_file()
    res = run_cli("draft_trainer", "export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "e"))
    assert res.returncode == 2 and "not empty" in res.stderr
    res = run_cli("draft_trainer", "export", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "f"))
    assert res.returncode == 2 and "not a complete draft checkpoint" in res.stderr


def test_export_overwrite_never_replaces_the_current_directory(tmp_path, monkeypatch):
    model, vocab, ckpt = make_ckpt(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="is not empty"):
        export_sglang(ckpt, work)
    monkeypatch.chdir(work)
    with pytest.raises(ExportError, match="it is the current directory"):
        export_sglang(ckpt, ".", overwrite=True)
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]


def test_resaved_checkpoint_replaces_only_itself(tmp_path):
    """Re-saving a step (a resume from an older checkpoint) swaps the step directory in; a user's
    file in the checkpoints directory and no temporary copy are left behind."""
    model, vocab, ckpt = make_ckpt(tmp_path)
    notes = ckpt.parent / "notes.txt"
    notes.write_text("keep me")
    (ckpt / "stale.txt").write_text("from the first save")
    again = save_checkpoint(model, vocab, tmp_path / "run")
    assert again == ckpt and (ckpt / "trainer.json").is_file() and not (ckpt / "stale.txt").exists()
    assert notes.read_text() == "keep me"
    assert sorted(p.name for p in ckpt.parent.iterdir() if p.name.startswith(".")) == []
