"""The named feature contract: a trainer asks for any list of layers and a teacher mode; the
server captures exactly that, and refuses at the handshake what it cannot capture."""

from __future__ import annotations

import pyarrow.flight as flight
import pytest
import torch
from transformers import AutoModelForCausalLM

from common.contract import check_feature_spec
from common.errors import ContractError
from common.features import FeatureSpec
from common.fp8 import Fp8Rows
from draft_trainer.client.target import TargetClient
from tests.support.procs import start_server

FIVE = (0, 1, 2, 3, 5)  # of a 6-layer model: the last one (5) included, before the final norm


@pytest.fixture(scope="module")
def six_layer_llama(tmp_path_factory):
    from draft_trainer.assets import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-6", "llama", num_layers=6)


@pytest.fixture(scope="module")
def llama_server(six_layer_llama, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("spec"), "--model", str(six_layer_llama), "--backend", "hf",
                       "--dtype", "fp32")
    yield srv
    srv.stop()


def _hidden_states(path, seq):
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref(torch.tensor([seq]), output_hidden_states=True)
    # hidden_states[i + 1] is layer i's output, except the last entry, which transformers
    # stores after the final norm: the pre-norm output of the last layer is captured by hooking.
    return out.hidden_states, ref


def test_five_layers_no_teacher_streams_exactly_those(llama_server, six_layer_llama):
    client = TargetClient(llama_server.endpoint)
    try:
        info = client.model_info()
        assert info.max_capture_layer == info.num_layers - 1
        spec = FeatureSpec(FIVE, teacher="none")
        check_feature_spec(info, spec)
        seq = torch.randint(0, info.vocab_size, (9,), generator=torch.Generator().manual_seed(1)).tolist()
        (f,) = client.features([7], [seq], teacher=spec.teacher, layer_ids=spec.layer_ids)
        hs, ref = _hidden_states(six_layer_llama, seq)
        H = info.hidden_size
        assert f.aux_T3H.shape == (len(seq), len(FIVE) * H)
        assert f.teacher_TH is None and f.topk_ids_TK is None
        blocks = f.aux_T3H.split(H, dim=-1)
        for lid, got in zip(FIVE[:-1], blocks[:-1]):
            assert torch.equal(got, hs[lid + 1][0]), lid
        # The last layer's output before the norm: the final norm of it is transformers' last state.
        normed = ref.model.norm(blocks[-1][None])[0]
        torch.testing.assert_close(normed, hs[-1][0], rtol=0, atol=1e-6)
        # Order is the request's: the same layers reversed come back reversed.
        (g,) = client.features([8], [seq], teacher="none", layer_ids=tuple(reversed(FIVE)))
        assert torch.equal(g.aux_T3H, torch.cat(list(reversed(blocks)), dim=-1))
        # The next request on the same connection takes the server's defaults again.
        (d,) = client.features([9], [seq])
        assert d.aux_T3H.shape == (len(seq), 3 * H) and d.teacher_TH is not None
    finally:
        client.close()


def test_layers_the_model_lacks_are_refused_naming_them(llama_server):
    client = TargetClient(llama_server.endpoint)
    try:
        info = client.model_info()
        spec = FeatureSpec((1, info.num_layers, 40), teacher="none")
        with pytest.raises(ContractError, match=rf"layer ids \[{info.num_layers}, 40\]"):
            check_feature_spec(info, spec, where="the target")
        # A client that skips the handshake check is refused by the server itself.
        with pytest.raises(flight.FlightError, match=rf"\[{info.num_layers}, 40\]"):
            list(client.features([1], [[1, 2, 3]], teacher="none", layer_ids=spec.layer_ids))
    finally:
        client.close()


def test_spec_against_a_server_from_before_feature_specs_is_refused():
    from common.contract import ModelInfo

    old = ModelInfo(architecture="LlamaForCausalLM", model_type="llama", num_layers=8, hidden_size=16, vocab_size=64,
                    aux_layer_ids=[1, 3, 4], dtype="float32", max_length=64, tokenizer_fingerprint="x")
    check_feature_spec(old, FeatureSpec((1, 3, 4)))  # its own aux layers: fine
    with pytest.raises(ContractError, match="only sends its aux layers"):
        check_feature_spec(old, FeatureSpec((0, 1, 2, 3, 4)))
    with pytest.raises(ContractError, match="teacher mode 'none'"):
        check_feature_spec(old, FeatureSpec((1, 3, 4), teacher="none"))


def test_server_streams_fp8_features_the_client_upcasts(llama_server):
    """aux and teacher asked as float8_e4m3: a real server casts, the client keeps the e4m3 bytes and
    scales as they arrived (Fp8Rows) and upcasts them to the served dtype within e4m3's bound of the
    same features sent in full precision; a wire dtype the server does not know is refused naming it."""
    client = TargetClient(llama_server.endpoint)
    try:
        info = client.model_info()
        seqs = [torch.randint(0, info.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                for n in (13, 4)]
        full = {f.sample_id: f for f in client.features([1, 2], seqs)}
        kept = {f.sample_id: f for f in client.features([1, 2], seqs, tensor_dtypes={"aux": "float8_e4m3",
                                                                                    "teacher": "float8_e4m3"})}
        assert all(isinstance(f.aux_T3H, Fp8Rows) and isinstance(f.teacher_TH, Fp8Rows) for f in kept.values())
        fp8 = {sid: f.upcast() for sid, f in kept.items()}
        H = info.hidden_size
        for sid, n in ((1, 13), (2, 4)):
            a, b = full[sid], fp8[sid]
            assert b.aux_T3H.dtype == a.aux_T3H.dtype == torch.float32 and b.aux_T3H.shape == (n, 3 * H)
            for x, y, groups in ((a.aux_T3H, b.aux_T3H, 3), (a.teacher_TH, b.teacher_TH, 1)):
                scale = x.view(n, groups, H).abs().amax(-1, keepdim=True).expand(-1, -1, H).reshape(n, -1) / 224  # scale: a power of 2, <= 2 amax/448
                assert ((y - x).abs() <= 2 ** -4 * x.abs() + 2 ** -10 * scale + 1e-30).all()
                assert not torch.equal(x, y)            # it really went through e4m3
        with pytest.raises(flight.FlightError, match="int4"):
            list(client.features([3], [[1, 2, 3]], tensor_dtypes={"aux": "int4"}))
    finally:
        client.close()
