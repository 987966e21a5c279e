"""common/cpu_linear.py: fp32 linears prepacked for oneDNN compute what torch's compute, keep the
model's ties and parameters, leave other dtypes and autograd alone."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.cpu_linear import PrepackedLinear, linear_fn, prepack_available, prepack_linears

pytestmark = pytest.mark.skipif(not prepack_available(), reason="this torch build has no oneDNN (CPU wheels do)")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (3, 7), (64,), (1, 300)])
def test_prepacked_equals_torch_linear_at_any_number_of_rows(bias, shape):
    torch.manual_seed(0)
    lin = nn.Linear(96, 160, bias=bias)
    x = torch.randn(*shape, 96)
    want = F.linear(x, lin.weight, lin.bias)
    with torch.inference_mode():
        got = PrepackedLinear(lin, rows_hint=6)(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_tiny_llama_prepacked_keeps_its_tied_head_and_computes_the_same_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 300, (1, 9))
    with torch.inference_mode():
        want = model(ids).logits
    n_params = sum(p.numel() for p in model.parameters())
    # q, k, v, o, gate, up, down per layer, and the head
    assert prepack_linears(model) == 2 * 7 + 1
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight           # the tie survives
    assert sum(p.numel() for p in model.parameters()) == n_params           # no parameter added or lost
    assert set(model.state_dict()) == set(LlamaForCausalLM(cfg).state_dict())
    with torch.inference_mode():
        got = model(ids).logits
        one_row = model(ids[:, :1]).logits                                  # the one-row path too
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_row[0, 0], want[0, 0], rtol=1e-5, atol=1e-5)


def test_other_dtypes_are_left_alone_and_autograd_takes_torchs_path():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.bfloat16))
    assert prepack_linears(model) == 1
    assert isinstance(model[0], PrepackedLinear) and type(model[1]) is nn.Linear
    x = torch.randn(3, 8, requires_grad=True)
    model[0](x).sum().backward()                                            # oneDNN's op has no backward
    assert x.grad is not None and model[0].weight.grad is not None


def test_linear_fn_packs_fp32_cpu_weights_and_passes_others_to_torch():
    torch.manual_seed(0)
    w32, x = torch.randn(40, 24), torch.randn(1, 5, 24)
    fn = linear_fn(w32)
    assert not isinstance(fn, functools.partial)                            # packed for oneDNN
    with torch.inference_mode():
        torch.testing.assert_close(fn(x), F.linear(x, w32), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fn(x[:, :1]), F.linear(x[:, :1], w32), rtol=1e-5, atol=1e-5)
    w16 = w32.to(torch.bfloat16)
    fn16 = linear_fn(w16)
    assert isinstance(fn16, functools.partial)                              # bf16: torch's own, bit for bit
    assert torch.equal(fn16(x.to(torch.bfloat16)), F.linear(x.to(torch.bfloat16), w16))
