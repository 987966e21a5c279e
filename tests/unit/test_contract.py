import pytest

from common.contract import ModelInfo, check_compatible, default_aux_layers, parse_aux_layers
from common.errors import ContractError


def info(**kw) -> ModelInfo:
    base = dict(architecture="LlamaForCausalLM", model_type="llama", num_layers=30, hidden_size=576,
                vocab_size=49152, aux_layer_ids=[1, 14, 26], dtype="bfloat16", max_length=8192,
                tokenizer_fingerprint="abc", teacher_modes=["hidden", "topk"], max_topk=64)
    base.update(kw)
    return ModelInfo(**base)


def test_default_aux_layers_smollm2():
    assert default_aux_layers(30) == [1, 14, 26]
    assert default_aux_layers(32) == [1, 15, 28]


def test_parse_aux_layers_rejects_last_layer_and_duplicates():
    assert parse_aux_layers("auto", 30) == [1, 14, 26]
    assert parse_aux_layers("2,5,9", 30) == [2, 5, 9]
    with pytest.raises(ContractError, match="out of range"):
        parse_aux_layers("1,14,29", 30)
    with pytest.raises(ContractError, match="distinct"):
        parse_aux_layers("1,1,2", 30)
    with pytest.raises(ContractError, match="exactly three"):
        parse_aux_layers("1,2", 30)
    with pytest.raises(ContractError, match="comma-separated"):
        parse_aux_layers("one,two,three", 30)


def test_proto_round_trip():
    a = info(hf_config_json='{"x": 1}', flight_port=123)
    assert ModelInfo.from_proto(a.to_proto()) == a


def test_mismatch_names_field_and_both_values():
    with pytest.raises(ContractError) as e:
        check_compatible(info(), info(tokenizer_fingerprint="zzz", hidden_size=512), expected_name="run",
                         actual_name="server 10.0.0.2:50051")
    msg = str(e.value)
    assert "tokenizer_fingerprint" in msg and "'abc'" in msg and "'zzz'" in msg
    assert "hidden_size" in msg and "576" in msg and "512" in msg and "10.0.0.2:50051" in msg


def test_teacher_mode_must_be_offered():
    with pytest.raises(ContractError, match="topk"):
        check_compatible(info(), info(teacher_modes=["hidden"]), expected_name="a", actual_name="b", teacher_mode="topk")
    check_compatible(info(), info(backend="sglang", model_name="other"), expected_name="a", actual_name="b")


def test_tokenizer_fingerprint_tracks_vocab(tiny_llama):
    from transformers import AutoTokenizer

    from common.contract import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    fp = tokenizer_fingerprint(tok)
    assert fp == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_llama))
    tok.add_tokens(["<brand-new-token>"])
    assert tokenizer_fingerprint(tok) != fp


def test_default_aux_layers_are_three_distinct_capturable_layers_at_every_depth():
    # 5- and 6-layer models used to get [1, 1, 1] and [1, 2, 2] (a repeated layer).
    for L in range(4, 81):
        ids = default_aux_layers(L)
        assert len(set(ids)) == 3 and ids == sorted(ids) and 0 <= ids[0] and ids[-1] <= L - 2, (L, ids)
