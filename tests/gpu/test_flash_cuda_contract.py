"""The CUDA flash wrapper keeps the CPU kernel's contract (shapes, lse layout [B,n,T] fp32, scale,
backward from a foreign o / lse), and the fused TTT on CUDA equals the reference on CUDA.
Needs CUDA: reported as skipped (not run) elsewhere."""

import pytest
import torch

from draft_trainer.methods.eagle3.ttt_fused import key_padding_mask, ttt_forward_fused
from draft_trainer.model.kernels.flash import CpuFlash, CudaFlash
from tests.support.eagle3 import padded_inputs, random_draft, tiny_cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: not run on this machine")


@pytest.mark.parametrize("dtype,masked", [(torch.bfloat16, False), (torch.float32, False), (torch.float32, True),
                                          (torch.bfloat16, True)], ids=["flash-bf16", "eff-fp32", "eff-mask", "eff-mask-bf16"])
def test_cuda_kernel_contract_matches_cpu(dtype, masked):
    g = torch.Generator().manual_seed(0)
    B, n, T, d = 2, 4, 77, 64                       # T not a multiple of 32: lse padding matters
    q, k, v = (torch.randn(B, n, T, d, generator=g).to(dtype) for _ in range(3))
    am = torch.ones(B, T, dtype=torch.long)
    am[1, :9] = 0
    mask = key_padding_mask(am, T, dtype) if masked else None
    scale = 0.11
    res = {}
    for kern, dev in ((CpuFlash(), "cpu"), (CudaFlash(), "cuda")):
        x = [t.to(dev) for t in (q, k, v)]
        m = None if mask is None else mask.to(dev)
        o, lse, st = kern.fwd(*x, m, not masked, scale)
        assert o.shape == (B, n, T, d) and lse.shape == (B, n, T) and lse.dtype == torch.float32, (kern.name, lse.shape)
        lse_m = torch.logaddexp(lse, torch.full_like(lse, 0.5))
        o_m = (o.float() * torch.exp(lse - lse_m)[..., None]).to(dtype)
        do = torch.randn(B, n, T, d, generator=torch.Generator().manual_seed(1)).to(dtype).to(dev)
        res[dev] = [t.float().cpu() for t in (o, lse, *kern.bwd(do, *x, o_m, lse_m, m, not masked, scale, st))]
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-4, atol=2e-4)
    for name, a, b in zip(["o", "lse", "dq", "dk", "dv"], res["cuda"], res["cpu"]):
        torch.testing.assert_close(a, b, **tol, msg=name)


def test_fused_ttt_on_cuda_equals_reference_on_cuda():
    cfg = tiny_cfg(head_dim=16)
    model = random_draft(cfg, dtype=torch.float32).cuda()
    aux, ids, am = (t.cuda() for t in padded_inputs(cfg, [40, 23], dtype=torch.float32))
    outs = {}
    for name, fn in (("ref", model.ttt_forward), ("fused", lambda *a: ttt_forward_fused(model, *a))):
        model.zero_grad(set_to_none=True)
        o = fn(aux, ids, 3, am)
        sum((x * am[..., None]).sin().sum() for x in o).backward()
        outs[name] = ([x.detach() for x in o], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    real = am.bool()
    for a, b in zip(outs["ref"][0], outs["fused"][0]):
        torch.testing.assert_close(b[real], a[real], rtol=1e-4, atol=1e-4)
    for n in outs["ref"][1]:
        torch.testing.assert_close(outs["fused"][1][n], outs["ref"][1][n], rtol=1e-3, atol=1e-4, msg=n)
