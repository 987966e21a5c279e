"""The flash-kernel contract (model/kernels/flash.py) on CPU: the plain-torch kernel and aten's CPU
flash op agree on o, lse layout and scale, and on the backward given a *foreign* (merged) o / lse,
which is what the fused TTT merge hands them; the fused TTT over the plain kernel (the path of
devices without a flash op) equals the reference. The CUDA wrapper's contract is checked against
the CPU kernel in tests/gpu/test_flash_cuda_contract.py (runs only where CUDA exists)."""

import pytest
import torch

from draft_trainer.methods.eagle3.ttt_fused import ttt_forward_fused
from draft_trainer.methods.eagle3.ttt_fused import key_padding_mask
from draft_trainer.model.kernels.flash import CpuFlash, MathKernel, cuda_bias, kernel_for, pad_lse
from tests.support.eagle3 import padded_inputs, random_draft, tiny_cfg


def _qkv(B=2, n=4, T=13, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, T, d, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "mask"])
def test_math_kernel_matches_cpu_flash_forward_and_foreign_lse_backward(masked):
    q, k, v = _qkv()
    am = torch.ones(2, 13, dtype=torch.long)
    am[1, :4] = 0                                   # left padding: a real mask
    mask = key_padding_mask(am, 13, q.dtype) if masked else None
    scale = 0.37                                    # not d**-0.5: the scale must be honoured
    outs = {}
    for kern in (CpuFlash(), MathKernel()):
        o, lse, st = kern.fwd(q, k, v, mask, not masked, scale)
        assert o.shape == q.shape and lse.shape == q.shape[:3]
        # a foreign o / lse, as the TTT merge hands over (extra mass from other keys)
        lse_m = torch.logaddexp(lse, torch.full_like(lse, 0.3))
        o_m = o * torch.exp(lse - lse_m)[..., None] + 0.1
        do = torch.randn_like(o, generator=torch.Generator().manual_seed(5))
        outs[kern.name] = (o, lse, *kern.bwd(do, q, k, v, o_m, lse_m, mask, not masked, scale, st))
    # the definition, for the forward
    s = q @ k.transpose(-1, -2) * scale
    s = s + mask if masked else s.masked_fill(torch.ones(13, 13, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(outs["math"][1], torch.logsumexp(s, -1))
    for a, b in zip(outs["math"], outs["cpu-flash"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert float(outs["math"][2].abs().sum()) > 0


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_fused_over_math_kernel_equals_reference(left):
    cfg = tiny_cfg()
    model = random_draft(cfg)
    aux, ids, am = padded_inputs(cfg, [9, 5], left=left)
    K = 3
    real = am.bool()
    refs, grads = [], []
    for fn in (model.ttt_forward, lambda *a: ttt_forward_fused(model, *a, kernel=MathKernel())):
        model.zero_grad(set_to_none=True)
        outs = fn(aux, ids, K, am)
        sum((o * am[..., None] * (k + 1)).sin().sum() for k, o in enumerate(outs)).backward()
        refs.append([o.detach()[real] for o in outs])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for a, b in zip(*refs):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-9, atol=1e-10, msg=name)


def test_cuda_layout_helpers_keep_values():
    """The CUDA wrapper's layout adapters (lse padded to 32, bias padded to 16) keep the values."""
    lse = torch.randn(2, 3, 13)
    padded = pad_lse(lse, 32)
    assert padded.shape == (2, 3, 32) and torch.equal(padded[..., :13], lse)
    mask = torch.randn(2, 1, 13, 13)
    bias = cuda_bias(mask, 4)
    assert bias.shape == (2, 4, 13, 13) and bias.stride(1) == 0 and bias.stride(2) % 16 == 0
    assert torch.equal(bias[:, 3], mask[:, 0])
    assert cuda_bias(None, 4) is None


def test_kernel_choice_by_device():
    q = torch.zeros(1, 1, 2, 8)
    assert kernel_for(q).name == "cpu-flash"
    assert kernel_for(q.to("meta")).name == "math"
