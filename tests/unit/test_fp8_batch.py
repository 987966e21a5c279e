"""FP8 features kept as they arrived (Fp8Rows) and upcast once, where the batch is built: the
padded batch equals decoding into the served dtype and then collating, bit for bit; the bytes
are never copied before that; the feature cache still stores the served dtype.

The device path (padded e4m3 bytes + scales moved, upcast on the device) is exercised on CPU
here by building it directly (`PaddedRows(fp8=True)`); it has not run on CUDA (no GPU here)."""

import numpy as np
import pytest
import torch

from common.contract import ModelInfo
from common.features import FeatureSchema, FeatureSpec, SampleAssembler, SampleFeatures, decode_batch, encode_batch
from common.fp8 import Fp8Rows, dequantize_e4m3, quantize_e4m3, upcast_e4m3, upcast_torch
from draft_trainer.data.batch import PaddedRows, collate, fp8_upcast_on_device
from draft_trainer.data.feature_cache import FeatureCacheReader, FeatureCacheWriter

H = 32
SERVED = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _features(dtype, lengths, seed=0, first_id=10):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(lengths):
        aux = torch.cat([torch.randn(n, H, generator=g) * m for m in (0.02, 5.0, 900.0)], -1)
        aux[0, :H] = 0.0                                    # an all-zero group
        aux[-1, H : H + 4] = torch.tensor([1e-6, -3e-7, 0.0, -0.0])  # e4m3 subnormals / zeros next to large values
        rows.append(SampleFeatures(first_id + i, 0, n, aux.to(dtype), torch.randn(n, H, generator=g).to(dtype) * 7))
    return rows


def _reference_decode(q_NW, scale_NG, served):
    """The definition, in torch: e4m3 value x scale, rounded once into the served dtype."""
    N, W = q_NW.shape
    G = scale_NG.shape[1]
    v = q_NW.view(torch.float8_e4m3fn).float().view(N, G, W // G) * scale_NG.float()[..., None]
    return v.to(served).view(N, W)


def _samples(feats):
    return [(f.sample_id, np.arange(f.length) % 7, np.ones(f.length, np.float32)) for f in feats]


def _kept(schema, rows, per_batch=2):
    """What the trainer's client delivers: record batches decoded with keep_fp8, samples in order."""
    out = []
    for i in range(0, len(rows), per_batch):
        out += decode_batch(encode_batch(schema, rows[i : i + per_batch]), keep_fp8=True)
    return out


@pytest.mark.parametrize("served", ["bfloat16", "float32"])
@pytest.mark.parametrize("batch_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", [("aux",), ("aux", "teacher")], ids=["aux", "aux+teacher"])
def test_batch_from_fp8_rows_equals_decode_then_collate(served, batch_dtype, which):
    lengths = (5, 1, 12, 7)                                 # ragged: padding in every sample but one
    spec = FeatureSpec((0, 1, 2), tensor_dtypes={w: "float8_e4m3" for w in which})
    schema = FeatureSchema.for_spec(spec, H, served)
    kept = _kept(schema, _features(SERVED[served], lengths))
    assert isinstance(kept[0].aux_T3H, Fp8Rows)
    assert isinstance(kept[0].teacher_TH, Fp8Rows) == ("teacher" in which)
    # reference: decode each row into the served dtype by the definition, then pad in torch
    T, B = max(lengths), len(lengths)
    ref_aux = torch.zeros(B, T, 3 * H, dtype=batch_dtype)
    ref_teacher = torch.zeros(B, T, H, dtype=batch_dtype)
    for b, f in enumerate(kept):
        a = f.aux_T3H
        ref_aux[b, : f.length] = _reference_decode(a.q_NW, a.scale_NG, SERVED[served])
        t = f.teacher_TH
        ref_teacher[b, : f.length] = _reference_decode(t.q_NW, t.scale_NG, SERVED[served]) if "teacher" in which else t
    got = collate(_samples(kept), kept, dtype=batch_dtype)
    decoded = collate(_samples(kept), [f.upcast() for f in kept], dtype=batch_dtype)  # decode, then collate
    for batch in (got, decoded):
        assert batch.aux_BT3H.dtype == batch_dtype
        assert torch.equal(batch.aux_BT3H.view(torch.int16 if batch_dtype == torch.bfloat16 else torch.int32),
                           ref_aux.view(torch.int16 if batch_dtype == torch.bfloat16 else torch.int32))  # bits, -0.0 too
        assert torch.equal(batch.teacher_BTH, ref_teacher)
    assert torch.equal(got.attention_mask_BT.sum(1), torch.tensor(lengths))
    assert (got.aux_BT3H[1, 1:] == 0).all() and (got.aux_BT3H[0, 5:] == 0).all()   # padding stays zero


@pytest.mark.parametrize("served", ["bfloat16", "float32"])
def test_device_path_moves_padded_bytes_and_upcasts_the_same(served):
    """The accelerator path's layout (padded e4m3 bytes + unit scales, upcast after the move) built
    on CPU: equal to the CPU-fused batch bit for bit, and it moves a quarter of fp32's bytes."""
    lengths = (3, 9, 1)
    schema = FeatureSchema.for_spec(FeatureSpec((0, 1, 2), tensor_dtypes={"aux": "float8_e4m3"}), H, served)
    kept = _kept(schema, _features(SERVED[served], lengths, seed=3))
    fused = collate(_samples(kept), kept)
    pad = PaddedRows(len(lengths), max(lengths), kept[0].aux_T3H, torch.float32, fp8=True)
    for b, f in enumerate(kept):
        pad.put(b, f.aux_T3H)
    moved = pad.q_MW.nbytes + pad.scale_MG.nbytes
    assert moved < 0.3 * fused.aux_BT3H.nbytes
    assert torch.equal(pad.build(torch.device("cpu")).view(torch.int32), fused.aux_BT3H.view(torch.int32))
    # the torch (device) upcast itself equals the CPU fast path, bit for bit
    rows = Fp8Rows(pad.q_MW, pad.scale_MG, SERVED[served])
    out = torch.empty(pad.q_MW.shape, dtype=torch.float32)
    assert torch.equal(upcast_torch(rows.q_NW, rows.scale_NG, rows.dtype, out).view(torch.int32),
                       rows.upcast(out=torch.empty_like(out)).view(torch.int32))


def test_one_place_decides_where_fp8_is_upcast():
    assert not fp8_upcast_on_device(torch.device("cpu"))
    assert fp8_upcast_on_device(torch.device("cuda", 0)) and fp8_upcast_on_device(torch.device("meta"))


@pytest.mark.parametrize("served", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [0, 7, -20, -117, -118, -126, 119])
def test_every_code_and_scale_upcasts_like_the_definition(served, out_dtype, k):
    """All 256 codes (subnormals, zeros, +-448), at scales 2^k up to the edges of the exact fast path
    (k < -117 decodes below bf16's normal range: the generic path), into bf16 and fp32."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]                    # NaN codes are not features
    q = torch.cat([codes, codes.flip(0)]).view(2, -1)        # 2 rows, 254 codes each: 2 groups of 127
    scale = torch.full((2, 2), 2.0 ** k)
    scale[1, 1] = 2.0 ** max(k - 3, -126)
    want = _reference_decode(q, scale, served).to(out_dtype)
    got = upcast_e4m3(q, scale, served, torch.empty(2, 254, dtype=out_dtype))
    bits = torch.int16 if out_dtype == torch.bfloat16 else torch.int32
    assert torch.equal(got.view(bits), want.view(bits))
    assert torch.equal(dequantize_e4m3(q, scale, served).view(torch.int16 if served == torch.bfloat16 else torch.int32),
                       _reference_decode(q, scale, served).view(torch.int16 if served == torch.bfloat16 else torch.int32))


def test_kept_rows_are_views_of_the_arrow_buffers_until_the_batch():
    schema = FeatureSchema.for_spec(FeatureSpec((0, 1, 2), tensor_dtypes={"aux": "float8_e4m3",
                                                                          "teacher": "float8_e4m3"}), H, "bfloat16")
    batch = encode_batch(schema, _features(torch.bfloat16, (4, 6)))
    a, b = decode_batch(batch, keep_fp8=True)
    assert a.aux_T3H.q_NW.data_ptr() == batch.column("aux").values.values.buffers()[1].address
    assert b.aux_T3H.q_NW.data_ptr() == a.aux_T3H.q_NW.data_ptr() + 4 * 3 * H
    assert b.aux_T3H.scale_NG.data_ptr() == batch.column("aux_scale").values.values.buffers()[1].address + 4 * 3 * 4
    assert a.teacher_TH.q_NW.data_ptr() == batch.column("teacher").values.values.buffers()[1].address
    assert a.aux_T3H.shape == (4, 3 * H) and a.length == 4 and a.aux_T3H.nbytes == 4 * 3 * H + 4 * 3 * 4


def test_chunked_sample_joins_fp8_rows_exactly():
    """A sample split over record batches (rows of one sample in several chunks) is joined as bytes
    and scales, and its batch equals the unsplit sample's."""
    schema = FeatureSchema.for_spec(FeatureSpec((0, 1, 2), tensor_dtypes={"aux": "float8_e4m3"}), H, "bfloat16")
    (whole,) = _features(torch.bfloat16, (9,))
    parts = [SampleFeatures(whole.sample_id, s, 9, whole.aux_T3H[s:e], whole.teacher_TH[s:e]) for s, e in ((0, 4), (4, 9))]
    asm = SampleAssembler()
    got = [asm.add(r) for p in parts for r in decode_batch(encode_batch(schema, [p]), keep_fp8=True)]
    assert got[0] is None and isinstance(got[1].aux_T3H, Fp8Rows) and got[1].length == 9
    (one,) = decode_batch(encode_batch(schema, [whole]), keep_fp8=True)
    assert torch.equal(collate(_samples([one]), [one]).aux_BT3H, collate(_samples(got[1:]), got[1:]).aux_BT3H)


def test_encoding_kept_rows_passes_the_bytes_through_or_upcasts():
    spec8 = FeatureSpec((0, 1, 2), tensor_dtypes={"aux": "float8_e4m3"})
    schema8 = FeatureSchema.for_spec(spec8, H, "bfloat16")
    first = encode_batch(schema8, _features(torch.bfloat16, (3, 5)))
    kept = decode_batch(first, keep_fp8=True)
    again = encode_batch(schema8, kept)                      # no re-quantization: the same bytes
    assert again.equals(first)
    plain = encode_batch(FeatureSchema.for_spec(FeatureSpec((0, 1, 2)), H, "bfloat16"), kept)
    for x, y in zip(decode_batch(plain), decode_batch(first)):
        assert torch.equal(x.aux_T3H, y.aux_T3H) and torch.equal(x.teacher_TH, y.teacher_TH)


def test_feature_cache_stores_the_served_dtype_of_kept_rows(tmp_path):
    info = ModelInfo(architecture="LlamaForCausalLM", model_type="llama", num_layers=4, hidden_size=H,
                     vocab_size=100, aux_layer_ids=[0, 1, 2], dtype="bfloat16", max_length=64,
                     tokenizer_fingerprint="t")
    spec8 = FeatureSpec((0, 1, 2), tensor_dtypes={"aux": "float8_e4m3", "teacher": "float8_e4m3"})
    kept = _kept(FeatureSchema.for_spec(spec8, H, "bfloat16"), _features(torch.bfloat16, (4, 2, 6)))
    w = FeatureCacheWriter(tmp_path / "c", info, FeatureSchema.for_spec(FeatureSpec((0, 1, 2)), H, "bfloat16"))
    assert w.add(kept)
    w.close()
    r = FeatureCacheReader(tmp_path / "c")
    for f in kept:
        c = r.get(f.sample_id)
        assert c.aux_T3H.dtype == torch.bfloat16 and not isinstance(c.aux_T3H, Fp8Rows)
        assert torch.equal(c.aux_T3H, f.aux_T3H.upcast()) and torch.equal(c.teacher_TH, f.teacher_TH.upcast())


def test_fp8_rows_refuse_what_they_are_not():
    q, s = quantize_e4m3(torch.randn(4, 2 * H).to(torch.bfloat16), H)
    with pytest.raises(ValueError, match="do not fit"):
        Fp8Rows(q.to(torch.int16), s, torch.bfloat16)
    with pytest.raises(ValueError, match="do not fit"):
        Fp8Rows(q, s[:3], torch.bfloat16)
    rows = Fp8Rows(q, s, torch.bfloat16)
    with pytest.raises(TypeError, match="row slices"):
        rows[0]
    with pytest.raises(ValueError, match="out is"):
        rows.upcast(out=torch.empty(3, 2 * H))
