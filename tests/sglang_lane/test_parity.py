"""SGLang backend vs HF backend, through the wire: two real target-server processes per model.

fp32, one sequence per forward pass: bit-exact (torch.equal). SGLang runs the same math as
transformers for Llama/Qwen3 (measured: every op of a decoder layer matches to 0.0).
fp32, several sequences in one forward pass: not bit-exact, bounded. SGLang packs the batch
into one [sum T, H] matrix while transformers pads to [B, Tmax, H]; a CPU GEMM's result for a
row depends on how many rows it is computed with (the kernel's blocking changes the summation
order), so values differ by a few fp32 ulps (measured max 1.4e-6 on these models). The HF
backend itself differs by the same amount between a batched and a single-sequence pass.
bf16: both round every op to bf16 but at slightly different points (SGLang keeps the residual
add in fp32 inside its fused norm): bounded relative to the values' scale.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from draft_trainer.client.target import TargetClient
from tests.support.procs import listening_addresses, start_server

SEQS = [
    [5, 17, 42, 99, 3, 250, 7, 8, 300, 11],
    [1, 2, 3],
    list(range(3, 60)),
    [(i * 37 + 11) % 500 + 2 for i in range(700)],  # long: one extend, never chunked
]
FP32_BATCH_ATOL = 1e-5  # ~100x the measured 1.4e-6: a layout bug shows up as O(1)


class Pair:
    def __init__(self, hf, sg):
        self.hf_srv, self.sg_srv = hf, sg
        self.hf, self.sg = TargetClient(hf.endpoint, timeout_s=120), TargetClient(sg.endpoint, timeout_s=120)

    def features(self, seqs, **kw):
        ids = list(range(len(seqs)))
        a = {f.sample_id: f for f in self.hf.features(ids, seqs, **kw)}
        b = {f.sample_id: f for f in self.sg.features(ids, seqs, **kw)}
        return [a[i] for i in ids], [b[i] for i in ids]

    def close(self):
        self.hf.close()
        self.sg.close()
        self.hf_srv.stop()
        self.sg_srv.stop()


def _pair(tmp_path, model, dtype, *extra):
    hf = start_server(tmp_path, "--model", str(model), "--backend", "hf", "--dtype", dtype, *extra, name="hf")
    try:
        sg = start_server(tmp_path, "--model", str(model), "--backend", "sglang", "--dtype", dtype, *extra,
                          name="sglang", timeout=300)
    except Exception:
        hf.stop()
        raise
    return Pair(hf, sg)


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_qwen3"])
def fp32_pair(request, tmp_path_factory):
    model = request.getfixturevalue(request.param)
    pair = _pair(tmp_path_factory.mktemp(f"{request.param}-fp32"), model, "fp32")
    yield pair
    pair.close()


def test_model_info_identical_except_backend(fp32_pair):
    a, b = fp32_pair.hf.model_info(), fp32_pair.sg.model_info()
    assert (a.backend, b.backend) == ("hf", "sglang")
    differ = [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
    assert set(differ) <= {"backend", "flight_port"}, differ


def test_sglang_server_listens_on_loopback_only(fp32_pair):
    # SGLang's default rendezvous store would listen on every interface (notes/sglang.md, trap 5).
    addrs = listening_addresses(fp32_pair.sg_srv.proc.pid)
    assert addrs and all(a in ("127.0.0.1", "::ffff:127.0.0.1") for a in addrs), addrs


def test_fp32_single_sequence_exact(fp32_pair):
    for s in SEQS:  # one request per sequence, waited for: each is its own forward pass
        (a,), (b,) = fp32_pair.features([s])
        assert b.aux_T3H.shape == (len(s), 3 * fp32_pair.hf.model_info().hidden_size)
        assert torch.equal(a.aux_T3H, b.aux_T3H), (a.aux_T3H - b.aux_T3H).abs().max()
        assert torch.equal(a.teacher_TH, b.teacher_TH), (a.teacher_TH - b.teacher_TH).abs().max()


def test_feature_spec_of_all_layers_and_no_teacher_streams_exactly_those(fp32_pair):
    """A request for every layer (four on these models, the last included: SGLang's is the final
    norm's input) in a scrambled order and no teacher: the same columns as the HF backend."""
    info = fp32_pair.hf.model_info()
    layers = (3, 0, 2, 1)
    assert sorted(layers) == list(range(info.num_layers))
    for s in SEQS[:3]:
        (a,), (b,) = fp32_pair.features([s], teacher="none", layer_ids=layers)
        assert b.aux_T3H.shape == (len(s), len(layers) * info.hidden_size)
        assert a.teacher_TH is None and b.teacher_TH is None
        torch.testing.assert_close(b.aux_T3H, a.aux_T3H, rtol=0, atol=FP32_BATCH_ATOL)
    # The next request goes back to the default three layers and the hidden teacher.
    (a,), (b,) = fp32_pair.features([SEQS[0]])
    assert torch.equal(a.aux_T3H, b.aux_T3H) and torch.equal(a.teacher_TH, b.teacher_TH)


def test_fp32_batched_bounded(fp32_pair):
    A, B = fp32_pair.features(SEQS)
    for s, a, b in zip(SEQS, A, B):
        assert b.aux_T3H.shape[0] == len(s) and b.teacher_TH.shape[0] == len(s)
        torch.testing.assert_close(b.aux_T3H, a.aux_T3H, rtol=0, atol=FP32_BATCH_ATOL)
        torch.testing.assert_close(b.teacher_TH, a.teacher_TH, rtol=0, atol=FP32_BATCH_ATOL)


def test_repeated_prompt_not_truncated_by_a_prefix_cache(fp32_pair):
    s = SEQS[3]
    (first,) = fp32_pair.features([s])[1]
    (again,) = fp32_pair.features([s])[1]
    assert again.aux_T3H.shape[0] == len(s)  # SGLang's radix cache would return 1 row here
    assert torch.equal(first.aux_T3H, again.aux_T3H)


def test_topk_teacher_parity(fp32_pair):
    for s in SEQS[:3]:
        (a,), (b,) = fp32_pair.features([s], teacher="topk", topk=16)
        assert b.topk_ids_TK.shape == (len(s), 16)
        assert torch.equal(a.topk_ids_TK, b.topk_ids_TK)
        assert torch.equal(a.topk_logprobs_TK, b.topk_logprobs_TK)


def test_frozen_tensors_identical(fp32_pair):
    names = ["embed_tokens", "lm_head", "final_norm"]
    a, b = fp32_pair.hf.fetch_tensors(names), fp32_pair.sg.fetch_tensors(names)
    for n in names:
        assert torch.equal(a[n], b[n]), n


def test_greedy_generation_identical(fp32_pair):
    prompts = [("p0", [5, 17, 42]), ("p1", list(range(3, 40)))]
    a = fp32_pair.hf.generate(prompts, max_new_tokens=12)
    b = fp32_pair.sg.generate(prompts, max_new_tokens=12)
    assert a == b and all(len(t) > 0 for _, t, _ in a)


def test_bf16_within_tolerance(tiny_llama, tmp_path_factory):
    pair = _pair(tmp_path_factory.mktemp("bf16"), tiny_llama, "bf16")
    try:
        info = pair.sg.model_info()
        assert info.dtype == pair.hf.model_info().dtype == "bfloat16"
        A, B = pair.features(SEQS)
        for a, b in zip(A, B):
            assert b.aux_T3H.dtype == torch.bfloat16
            for x, y in ((a.aux_T3H.float(), b.aux_T3H.float()), (a.teacher_TH.float(), b.teacher_TH.float())):
                # A few bf16 ulps of the tensor's scale (bf16 has 8 mantissa bits: ulp = 2^-7 relative).
                scale = x.abs().amax(dim=-1, keepdim=True)
                assert ((x - y).abs() <= 4 * 2**-7 * scale).all(), ((x - y).abs() / scale).max()
                assert (x - y).abs().mean() <= 2 * 2**-7 * x.abs().mean()  # measured ~1 ulp (0.8%)
        A, B = pair.features(SEQS[:3], teacher="topk", topk=8)
        for a, b in zip(A, B):
            # The top-1 token may swap only where two log-probs are within bf16 noise.
            same_top1 = (a.topk_ids_TK[:, 0] == b.topk_ids_TK[:, 0]).float().mean()
            assert same_top1 >= 0.9, same_top1
            assert (a.topk_logprobs_TK[:, 0] - b.topk_logprobs_TK[:, 0]).abs().max() < 0.5
    finally:
        pair.close()
