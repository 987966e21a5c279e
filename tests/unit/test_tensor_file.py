"""FetchTensors' streamed safetensors file: parses with the safetensors library, chunks cover it
exactly, and the digest is the sha256 of the bytes a client reassembles."""

import hashlib

import pytest
import torch
from safetensors.torch import load as safetensors_load

from target_server.tensors import TensorFile


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "lm_head": torch.randn(37, 8, generator=g).to(torch.bfloat16),
        "embed_tokens": torch.randn(37, 8, generator=g),
        "final_norm": torch.randn(8, generator=g).half(),
        "ids": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "strided": torch.randn(6, 4, generator=g).t(),  # non-contiguous input
    }


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, 1 << 20])
def test_chunks_reassemble_to_a_valid_safetensors_file(chunk):
    src = tensors()
    tf = TensorFile(src, metadata={"source": "test"})
    pieces = list(tf.chunks(chunk))
    offsets = [o for o, _ in pieces]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert all(len(d) <= chunk for _, d in pieces)
    blob = b"".join(d for _, d in pieces)
    assert len(blob) == tf.total_bytes
    assert hashlib.sha256(blob).hexdigest() == tf.sha256()
    got = safetensors_load(blob)
    assert set(got) == set(src)
    for name, t in src.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name], t), name


def test_digest_changes_with_any_value():
    a = tensors()
    b = tensors()
    b["lm_head"] = b["lm_head"].clone()
    b["lm_head"][3, 2] += 1
    assert TensorFile(a).sha256() != TensorFile(b).sha256()
    assert TensorFile(a).sha256() == TensorFile(tensors()).sha256()
