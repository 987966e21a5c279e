"""The fused TTT attention (ttt_fused.py) equals the readable reference (Eagle3Draft.ttt_forward)
in forward and in every parameter gradient, on random inputs with padding and variable lengths."""

import pytest
import torch

from draft_trainer.methods.eagle3.ttt_fused import ttt_forward_fused
from tests.support.eagle3 import padded_inputs, random_draft, tiny_cfg


def run(model, fn, aux, ids, am, K, w):
    model.zero_grad(set_to_none=True)
    outs = fn(aux, ids, K, am)
    # A loss that touches every step and every real position (padded positions weigh 0, like
    # the training loss); the second term also exercises the lm_head path.
    loss = sum(((o * w[k]) * am[..., None]).sum() + (model.logits(o).tanh() * am[..., None]).sum() * 0.1
               for k, o in enumerate(outs))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
def test_fused_equals_reference_fp64(left, gqa):
    cfg = tiny_cfg(num_key_value_heads=2 if gqa else 4)
    model = random_draft(cfg)
    aux, ids, am = padded_inputs(cfg, [11, 7, 3], left=left)
    K = 4
    w = torch.randn(K, *ids.shape, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref_out, ref_g = run(model, model.ttt_forward, aux, ids, am, K, w)
    fused_out, fused_g = run(model, lambda *a: ttt_forward_fused(model, *a), aux, ids, am, K, w)
    real = am.bool()
    for k in range(K):
        assert torch.isfinite(fused_out[k]).all()
        torch.testing.assert_close(fused_out[k][real], ref_out[k][real], rtol=1e-10, atol=1e-10)
    assert ref_g.keys() == fused_g.keys() and "fc.weight" in ref_g and "midlayer.self_attn.k_proj.weight" in ref_g
    for name in ref_g:
        torch.testing.assert_close(fused_g[name], ref_g[name], rtol=1e-9, atol=1e-10, msg=name)


def test_fused_bf16_autocast_close_to_fp32_reference():
    """bf16 compute (autocast) stays close to the fp32 reference: same math, lower precision."""
    cfg = tiny_cfg()
    model = random_draft(cfg, dtype=torch.float32)
    aux, ids, am = padded_inputs(cfg, [16, 9], dtype=torch.float32)
    K = 3
    w = torch.randn(K, *ids.shape, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    ref_out, ref_g = run(model, model.ttt_forward, aux, ids, am, K, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, g = run(model, lambda *a: ttt_forward_fused(model, *a), aux, ids, am, K, w)
    real = am.bool()
    for k in range(K):
        err = (out[k].float() - ref_out[k])[real].norm() / ref_out[k][real].norm()
        assert err < 3e-2, (k, float(err))
    for name in ref_g:
        err = (g[name] - ref_g[name]).norm() / ref_g[name].norm().clamp_min(1e-12)
        assert err < 5e-2, (name, float(err))


def test_single_step_is_plain_causal_attention():
    """K=1 needs no diagonal keys; the fused path must still equal the reference."""
    cfg = tiny_cfg()
    model = random_draft(cfg)
    aux, ids, am = padded_inputs(cfg, [6, 6])
    (a,) = model.ttt_forward(aux, ids, 1, am)
    (b,) = ttt_forward_fused(model, aux, ids, 1, am)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
