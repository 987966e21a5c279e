"""The HF backend is exact, for Llama and Qwen3.

How the batched path is proven: a padded multi-sequence forward is compared *exactly* with
transformers' `output_hidden_states` on the same padded batch (same shapes, same mask), and a
single sequence exactly with transformers on that sequence alone. A padded batch differs from
per-sequence runs only by float reassociation (~1e-6 in fp32, from different matmul shapes);
that bound is checked too, and is what a trainer sees when the scheduler packs its samples
with other clients'. bf16 equals transformers' bf16 exactly and fp32 within bf16 tolerance.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.contract import default_aux_layers, tokenizer_fingerprint
from common.errors import AssetError, ConfigError, ContractError
from draft_trainer.client.target import TargetClient
from target_server.backends.hf import HFBackend
from tests.support.procs import run_cli, start_server

FAMILIES = ["tiny_llama", "tiny_qwen3"]
LENGTHS = [13, 5, 9, 1]


def _seqs(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _padded_reference(model, seqs):
    """transformers on the same right-padded batch the backend builds: hidden_states tuple."""
    B, Tm = len(seqs), max(map(len, seqs))
    ids_BT = torch.zeros(B, Tm, dtype=torch.long)
    mask_BT = torch.zeros(B, Tm, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids_BT[b, : len(s)] = torch.tensor(s)
        mask_BT[b, : len(s)] = 1
    with torch.no_grad():
        return model(ids_BT, attention_mask=mask_BT, output_hidden_states=True).hidden_states


def _single_reference(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq]), output_hidden_states=True).hidden_states


def _aux(hs, b: int, T: int, aux_ids) -> torch.Tensor:
    return torch.cat([hs[i + 1][b, :T] for i in aux_ids], dim=-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_exact_single_and_padded_batch(family, request):
    path = request.getfixturevalue(family)
    be = HFBackend(path, dtype="fp32")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seqs = _seqs(be.vocab_size)
    caps = be.forward(seqs, "hidden")
    hs = _padded_reference(ref, seqs)
    for b, s in enumerate(seqs):
        assert caps[b].aux_T3H.shape == (len(s), 3 * be.hidden_size)
        assert torch.equal(caps[b].aux_T3H, _aux(hs, b, len(s), be.aux_layer_ids)), (family, b)
        assert torch.equal(caps[b].teacher_TH, hs[-1][b, : len(s)]), (family, b)
        # Against the sequence run alone: equal up to float reassociation.
        h1 = _single_reference(ref, s)
        torch.testing.assert_close(caps[b].aux_T3H, _aux(h1, 0, len(s), be.aux_layer_ids), rtol=0, atol=1e-5)
        torch.testing.assert_close(caps[b].teacher_TH, h1[-1][0], rtol=0, atol=1e-5)
    (one,) = be.forward([seqs[0]], "hidden")
    h1 = _single_reference(ref, seqs[0])
    assert torch.equal(one.aux_T3H, _aux(h1, 0, len(seqs[0]), be.aux_layer_ids))
    assert torch.equal(one.teacher_TH, h1[-1][0])


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_exact_vs_transformers_bf16_and_close_to_fp32(family, request):
    path = request.getfixturevalue(family)
    be = HFBackend(path, dtype="bf16")
    ref16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ref32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seqs = _seqs(be.vocab_size, seed=1)
    caps = be.forward(seqs, "hidden")
    hs16 = _padded_reference(ref16, seqs)
    for b, s in enumerate(seqs):
        assert caps[b].aux_T3H.dtype == torch.bfloat16
        assert torch.equal(caps[b].aux_T3H, _aux(hs16, b, len(s), be.aux_layer_ids))
        assert torch.equal(caps[b].teacher_TH, hs16[-1][b, : len(s)])
        h32 = _single_reference(ref32, s)
        for got, want in ((caps[b].aux_T3H, _aux(h32, 0, len(s), be.aux_layer_ids)), (caps[b].teacher_TH, h32[-1][0])):
            err = (got.float() - want).norm() / want.norm()
            assert err < 2e-2, f"{family} seq {b}: bf16 relative error {err:.4f} vs fp32"


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_teacher_matches_transformers_log_softmax(family, request):
    path = request.getfixturevalue(family)
    be = HFBackend(path, dtype="fp32")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seqs = _seqs(be.vocab_size, lengths=[7, 3])
    caps = be.forward(seqs, "topk", topk=5)
    for cap, s in zip(caps, seqs):
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([s])).logits[0].float(), dim=-1)
        v, i = logp.topk(5, dim=-1)
        assert cap.teacher_TH is None and cap.topk_ids_TK.dtype == torch.int32
        assert torch.equal(cap.topk_ids_TK, i.to(torch.int32))
        torch.testing.assert_close(cap.topk_logprobs_TK, v, rtol=0, atol=1e-5)


def test_hooks_keep_only_what_eagle3_needs(tiny_llama):
    be = HFBackend(tiny_llama, dtype="fp32")
    layers = be._decoder.layers
    hooked = [i for i, layer in enumerate(layers) if layer._forward_hooks]
    assert hooked == sorted(be.aux_layer_ids)
    assert len(be._decoder.norm._forward_hooks) == 1
    be.forward(_seqs(be.vocab_size), "hidden")
    assert be._captured == {}  # nothing retained between passes


# ------------------------------------------------------------------------ over the wire

@pytest.fixture(scope="module")
def qwen_server(tiny_qwen3, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("qwen"), "--model", str(tiny_qwen3), "--backend", "hf",
                       "--dtype", "fp32", "--max-topk", "8")
    yield srv
    srv.stop()


def test_wire_padded_batch_exact_and_topk_negotiated_per_request(qwen_server, tiny_qwen3):
    client = TargetClient(qwen_server.endpoint)
    try:
        info = client.model_info()
        seqs = _seqs(info.vocab_size, seed=3)
        # One request: the scheduler packs its samples into one padded forward, in order.
        got = {f.sample_id: f for f in client.features([10, 11, 12, 13], seqs)}
        ref = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
        hs = _padded_reference(ref, seqs)
        for b, s in enumerate(seqs):
            f = got[10 + b]
            assert f.num_tokens == len(s)
            assert torch.equal(f.aux_T3H, _aux(hs, b, len(s), info.aux_layer_ids))
            assert torch.equal(f.teacher_TH, hs[-1][b, : len(s)])
        # The next request on the same connection asks for top-k instead.
        (f,) = client.features([20], [seqs[0]], teacher="topk", topk=8)
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([seqs[0]])).logits[0].float(), dim=-1)
        v, i = logp.topk(8, dim=-1)
        assert f.teacher_TH is None and torch.equal(f.topk_ids_TK, i.to(torch.int32))
        torch.testing.assert_close(f.topk_logprobs_TK, v, rtol=0, atol=1e-5)
    finally:
        client.close()


def test_model_info_contract_and_fetch_tensors(qwen_server, tiny_qwen3):
    client = TargetClient(qwen_server.endpoint)
    try:
        info = client.model_info()
        tok = AutoTokenizer.from_pretrained(tiny_qwen3)
        assert info.backend == "hf" and info.model_type == "qwen3" and info.architecture == "Qwen3ForCausalLM"
        assert info.tokenizer_fingerprint == tokenizer_fingerprint(tok)
        assert info.chat_template and info.chat_template == tok.chat_template
        assert info.aux_layer_ids == default_aux_layers(info.num_layers)
        assert info.teacher_modes == ["hidden", "topk"] and info.max_topk == 8
        assert info.dtype == "float32" and info.flight_port == qwen_server.flight_port
        assert info.hf_config["hidden_size"] == info.hidden_size
        frozen = client.fetch_tensors([])  # empty = all three
        weights = load_file(str(tiny_qwen3 / "model.safetensors"))
        assert set(frozen) == {"embed_tokens", "lm_head", "final_norm"}
        assert torch.equal(frozen["embed_tokens"], weights["model.embed_tokens.weight"])
        assert torch.equal(frozen["lm_head"], weights["lm_head.weight"])
        assert torch.equal(frozen["final_norm"], weights["model.norm.weight"])
        # Decoder-layer weights (draft initialisation from a target layer, model.init=target).
        names = ["layers.1.self_attn.q_proj", "layers.1.mlp.down_proj", "layers.1.input_layernorm"]
        layer = client.fetch_tensors(names)
        for n in names:
            assert torch.equal(layer[n], weights[f"model.{n}.weight"]), n
        with pytest.raises(ContractError, match="layer 99 out of range"):
            client.fetch_tensors(["layers.99.mlp.up_proj"])
        with pytest.raises(ContractError, match="unknown tensor name 'layers.1.rotary'"):
            client.fetch_tensors(["layers.1.rotary"])
    finally:
        client.close()


def test_explicit_aux_layers(tiny_llama):
    be = HFBackend(tiny_llama, dtype="fp32", aux_layers="0,2,1")
    assert be.model_info().aux_layer_ids == [0, 2, 1]
    (cap,) = be.forward([[3, 4, 5]], "hidden")
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    assert torch.equal(cap.aux_T3H, _aux(_single_reference(ref, [3, 4, 5]), 0, 3, [0, 2, 1]))


def test_bad_flags_fail_fast_with_a_clear_message(tiny_llama, tmp_path):
    res = run_cli("target_server", "serve", "--model", str(tiny_llama), "--aux-layers", "1,1,9", timeout=120)
    assert res.returncode == 2 and "out of range" in res.stderr and "Traceback" not in res.stderr
    with pytest.raises(AssetError, match="no config.json"):
        HFBackend(tmp_path / "nope")
    with pytest.raises(ConfigError, match="--dtype"):
        HFBackend(tiny_llama, dtype="int8")
