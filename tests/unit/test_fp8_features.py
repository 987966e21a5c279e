"""FP8 (e4m3, per-token scale) features on the wire: error bound, bytes, in-place reads, the
contract (spec / schema / metadata), bad input."""

import pytest
import torch

from common.errors import SchemaError
from common.features import FeatureSchema, FeatureSpec, SampleFeatures, _column_tensor, decode_batch, encode_batch
from common.fp8 import dequantize_e4m3, quantize_e4m3

H = 64


def _rows(dtype=torch.bfloat16, lengths=(5, 1, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(lengths):
        # layers of very different magnitudes (as real aux layers): one scale per layer matters
        aux = torch.cat([torch.randn(n, H, generator=g) * m for m in (0.05, 3.0, 400.0)], -1)
        aux[0, :H] = 0.0                                  # an all-zero group: scale must not divide by 0
        rows.append(SampleFeatures(100 + i, 0, n, aux.to(dtype), teacher_TH=torch.randn(n, H, generator=g).to(dtype)))
    return rows


def _bound_ok(x, got, scale_per_elem):
    # 3 mantissa bits: half an ulp is 2^-4 relative; subnormals: 2^-10 of the scale; bf16 decode: 2^-8.
    err = (got.float() - x.float()).abs()
    bound = (2 ** -4 + 2 ** -8) * x.float().abs() + 2 ** -10 * scale_per_elem + 1e-30
    return bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("which", [("aux",), ("aux", "teacher")], ids=["aux", "aux+teacher"])
def test_round_trip_within_the_e4m3_bound_and_half_the_bytes(which):
    rows = _rows()
    spec_bf16 = FeatureSpec((0, 1, 2))
    spec_fp8 = FeatureSpec((0, 1, 2), tensor_dtypes={w: "float8_e4m3" for w in which})
    b16 = encode_batch(FeatureSchema.for_spec(spec_bf16, H, "bfloat16"), rows)
    b8 = encode_batch(FeatureSchema.for_spec(spec_fp8, H, "bfloat16"), rows)
    out = decode_batch(b8)
    assert [r.sample_id for r in out] == [100, 101, 102]
    for r, o in zip(rows, out):
        assert o.aux_T3H.dtype == torch.bfloat16 and o.aux_T3H.shape == r.aux_T3H.shape
        scale = r.aux_T3H.float().view(r.length, 3, H).abs().amax(-1, keepdim=True).expand(-1, -1, H) / 224  # scale: a power of 2, <= 2 amax/448
        ok, worst = _bound_ok(r.aux_T3H, o.aux_T3H, scale.reshape(r.length, 3 * H))
        assert ok, worst
        assert torch.equal(o.aux_T3H[0, :H], torch.zeros(H, dtype=torch.bfloat16))
        rel = (o.aux_T3H.float() - r.aux_T3H.float()).norm() / r.aux_T3H.float().norm()
        assert 0 < rel < 0.04, float(rel)                 # lossy (not a copy), but close
        if "teacher" in which:
            ts = r.teacher_TH.float().abs().amax(-1, keepdim=True) / 224  # scale: a power of 2, <= 2 amax/448
            assert _bound_ok(r.teacher_TH, o.teacher_TH, ts)[0]
        else:
            assert torch.equal(o.teacher_TH, r.teacher_TH)
    # bytes: e4m3 halves bf16's payload; per-token scales add 4 bytes per token and layer
    tokens, W = sum(r.length for r in rows), 3 * H
    aux16 = b16.column("aux").nbytes
    aux8 = b8.column("aux").nbytes + b8.column("aux_scale").nbytes
    assert aux8 < 0.6 * aux16, (aux8, aux16)
    assert b8.column("aux").values.values.nbytes == tokens * W


def test_decode_reads_e4m3_bytes_in_place_and_upcasts_into_one_tensor():
    rows = _rows(lengths=(3, 4, 5))
    schema = FeatureSchema.for_spec(FeatureSpec((0, 1, 2), tensor_dtypes={"aux": "float8_e4m3"}), H, "bfloat16")
    batch = encode_batch(schema, rows)
    q, _ = _column_tensor(batch.column("aux"), 3 * H, torch.uint8)
    assert q.data_ptr() == batch.column("aux").values.values.buffers()[1].address   # no copy of the payload
    out = decode_batch(batch)
    # every row is a view of one upcast [N, W] tensor (one allocation for the batch) ...
    base = out[0].aux_T3H.data_ptr()
    for r in out[1:]:
        assert r.aux_T3H.untyped_storage().data_ptr() == out[0].aux_T3H.untyped_storage().data_ptr()
    assert out[2].aux_T3H.data_ptr() - base == 7 * 3 * H * 2
    # ... and the bf16 teacher column is still a view of its Arrow buffer
    assert out[0].teacher_TH.data_ptr() == batch.column("teacher").values.values.buffers()[1].address


def test_quantize_dequantize_direct_and_bad_group():
    x = torch.randn(4, 2 * H, dtype=torch.float32) * 10
    q, s = quantize_e4m3(x, H)
    assert q.dtype == torch.uint8 and s.shape == (4, 2)
    assert torch.equal(torch.log2(s), torch.log2(s).round())                     # powers of two
    amax = x.view(4, 2, H).abs().amax(-1)
    assert ((amax / s <= 448) & (amax / s > 224)).all()                          # the smallest such power
    y = dequantize_e4m3(q, s, torch.float32)
    assert (y - x).abs().max() <= 2 ** -4 * x.abs().max()
    with pytest.raises(ValueError, match="not a multiple"):
        quantize_e4m3(x[:, :H + 1], H)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_bit_paths_equal_torch_casts(dtype):
    """The CPU fast paths (bit arithmetic + tables) give exactly torch's e4m3 casts with the same
    scales: signs, zeros, e4m3 subnormals, values that underflow, a group's largest value."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 3 * H, generator=g) * torch.tensor([1e-3, 2.0, 900.0]).repeat_interleave(H)
    x[0] = 0.0
    x[1, :H] = torch.logspace(-30, 2, H)               # from far below e4m3's range up to the max
    x[2, 5] = -x[2].abs().max() * 1.5                  # a negative largest value
    x = x.to(dtype)
    q, s = quantize_e4m3(x, H)
    ref = (x.float().view(64, 3, H) / s[..., None]).to(torch.float8_e4m3fn).view(torch.uint8).reshape(64, -1)
    assert torch.equal(q, ref)
    y = dequantize_e4m3(q, s, dtype)
    y_ref = (ref.view(torch.float8_e4m3fn).float().view(64, 3, H) * s[..., None]).reshape(64, -1).to(dtype)
    assert torch.equal(y, y_ref)
    assert torch.equal(y[0], torch.zeros(3 * H, dtype=dtype))
    # a scale that is not a power of two (another encoder) takes the generic path, still right
    y2 = dequantize_e4m3(q, s * 1.5, dtype)
    torch.testing.assert_close(y2.float(), y_ref.float() * 1.5, rtol=1e-2, atol=0)


def test_schema_carries_tensor_dtypes_and_refuses_bad_ones():
    spec = FeatureSpec((0, 1, 2), tensor_dtypes="teacher=float8_e4m3,aux=float8_e4m3")
    assert spec.tensor_dtypes == (("aux", "float8_e4m3"), ("teacher", "float8_e4m3"))
    schema = FeatureSchema.for_spec(spec, H, "bfloat16")
    assert FeatureSchema.from_arrow(schema.arrow()) == schema
    assert FeatureSchema.from_arrow(FeatureSchema(H, "bfloat16").arrow()).tensor_dtypes == ()
    assert "aux_scale" in schema.arrow().names and "teacher_scale" in schema.arrow().names
    with pytest.raises(SchemaError, match="not one of"):
        FeatureSpec((0,), tensor_dtypes={"aux": "float8_e5m2"})
    with pytest.raises(SchemaError, match="no choosable dtype"):
        FeatureSpec((0,), tensor_dtypes={"topk_logprobs": "float8_e4m3"})
    with pytest.raises(SchemaError, match="needs teacher=hidden"):
        FeatureSpec((0,), teacher="none", tensor_dtypes={"teacher": "float8_e4m3"})
    # metadata that claims fp8 over a bf16 layout is refused
    bad = FeatureSchema(H, "bfloat16", layer_ids=(0, 1, 2)).arrow().with_metadata(
        {**schema.arrow().metadata})
    with pytest.raises(SchemaError, match="does not match"):
        FeatureSchema.from_arrow(bad)


def test_trainer_config_checks_wire_dtypes():
    from common.config import load_config
    from common.errors import ConfigError
    from draft_trainer.config import TrainConfig

    base = ["data.path=x", "targets.endpoints=127.0.0.1:1"]
    cfg = load_config(TrainConfig, None, base + ["targets.wire_dtypes=aux=float8_e4m3"])
    assert FeatureSpec((0,), tensor_dtypes=cfg.targets.wire_dtypes).tensor_dtypes == (("aux", "float8_e4m3"),)
    with pytest.raises(ConfigError, match="targets.wire_dtypes.*aux=fp4"):
        load_config(TrainConfig, None, base + ["targets.wire_dtypes=aux=fp4"])


def test_scale_exponent_from_the_bits_matches_the_float_formula():
    """The bf16 encode derives each group's scale from the amax bits; it must pick the same power of
    two as ceil(log2(amax / 448)) (the generic path, fp32 input) for every bf16 mantissa, at exact
    448 * 2^j, on either sign, next to zeros and down to the clamped exponents."""
    mant = torch.arange(128, dtype=torch.int32)
    rows = []
    for E in (1, 9, 100, 127, 135, 136, 200, 254):
        top = ((E << 7) | mant).to(torch.int16).view(torch.bfloat16).float()   # amax candidates 2^(E-127) * 1.M
        g = torch.randn(128, 16, generator=torch.Generator().manual_seed(E)).clamp(-1, 1) * top[:, None]
        g[:, 0] = top * torch.where(mant % 2 == 0, 1.0, -1.0)                     # the maximum, either sign
        rows.append(g)
    x = torch.cat(rows)
    x[5] = 0.0
    xb = x.to(torch.bfloat16)
    q, s = quantize_e4m3(xb, 16)
    q_ref, s_ref = quantize_e4m3(xb.float(), 16)                                 # fp32 input: the torch path
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref)
