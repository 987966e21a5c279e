"""Where the data plane copies: a one-row batch is encoded without a copy (the Arrow buffer is
the tensor's memory), and joined rows are exact for every wire dtype."""

import pytest
import torch

from common.features import FeatureSchema, SampleFeatures, concat_rows, decode_batch, encode_batch
from target_server.backends.synthetic import SyntheticBackend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int32])
def test_concat_rows_equals_torch_cat(dtype):
    g = torch.Generator().manual_seed(0)
    parts = [(torch.randn(n, 6, generator=g) * 100).to(dtype) for n in (3, 1, 5)]
    assert torch.equal(concat_rows(parts), torch.cat(parts))
    assert concat_rows(parts).dtype == dtype
    assert concat_rows(parts[:1]) is parts[0]


@pytest.mark.parametrize("wire", ["bfloat16", "float32"])
def test_single_row_batch_is_encoded_without_a_copy(wire):
    dt = torch.bfloat16 if wire == "bfloat16" else torch.float32
    aux = torch.randn(7, 12).to(dt)
    teacher = torch.randn(7, 4).to(dt)
    batch = encode_batch(FeatureSchema(4, wire), [SampleFeatures(1, 0, 7, aux, teacher)])
    values = batch.column("aux").values.values
    assert values.buffers()[1].address == aux.data_ptr()
    (row,) = decode_batch(batch)
    assert torch.equal(row.aux_T3H, aux) and torch.equal(row.teacher_TH, teacher)


def test_synthetic_features_are_deterministic_views():
    a, b = SyntheticBackend(hidden_size=16, dtype="bf16"), SyntheticBackend(hidden_size=16, dtype="bf16")
    seqs = [[1, 2, 3], [3, 2, 1], list(range(600))]  # the long one grows the pool
    ca, cb = a.forward(seqs, "hidden"), b.forward(seqs[::-1], "hidden")[::-1]
    for x, y, s in zip(ca, cb, seqs):
        assert x.aux_T3H.shape == (len(s), 48) and x.teacher_TH.shape == (len(s), 16)
        assert torch.equal(x.aux_T3H, y.aux_T3H) and torch.equal(x.teacher_TH, y.teacher_TH)
    assert not torch.equal(ca[0].aux_T3H, ca[1].aux_T3H)  # other ids, other features
    assert ca[2].aux_T3H._base is not None  # a view of the pool: no per-request copy
    # Growing the pool keeps earlier answers.
    c = SyntheticBackend(hidden_size=16, dtype="bf16")
    (first,) = c.forward([[1, 2, 3]], "hidden")
    rows_before = c._aux_pool_N3H.shape[0]
    c.forward([list(range(2000))], "hidden")
    assert c._aux_pool_N3H.shape[0] > rows_before
    (again,) = c.forward([[1, 2, 3]], "hidden")
    assert torch.equal(first.aux_T3H, again.aux_T3H) and torch.equal(first.aux_T3H, ca[0].aux_T3H)
