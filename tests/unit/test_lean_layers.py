"""The layers keep less for backward (model/layers.py) with the results of autograd's plain form:
autocast_once (one bf16 copy of a linear input shared by n linears, input gradient summed in fp32 as n
separate autocast casts give), SwiGLU (gate/up outputs only) and RMSNorm (input + rsqrt only)."""

import torch

from draft_trainer.model.layers import autocast_once


def _three_linears(x, ws, shared: bool):
    x = x * 1.0     # not a leaf, as in the model (autocast caches casts of leaves that require grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xs = autocast_once(x, 3) if shared else (x, x, x)
        return [torch.nn.functional.linear(xi, w) for xi, w in zip(xs, ws)]


def _saved_storages(fn) -> set[int]:
    ptrs = set()

    def pack(t):
        ptrs.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return ptrs, out


def test_shared_cast_equals_separate_casts_and_keeps_one_copy():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, 48, generator=g, requires_grad=True) for n in (32, 16, 16)]
    gy = [torch.randn(40, n, generator=g) for n in (32, 16, 16)]
    x0 = torch.randn(40, 48, generator=g)
    grads, saved = {}, {}
    for shared in (False, True):
        x = x0.clone().requires_grad_()
        ptrs, ys = _saved_storages(lambda: _three_linears(x, ws, shared))
        saved[shared] = ptrs - {w.untyped_storage().data_ptr() for w in ws}
        assert all(y.dtype == torch.bfloat16 for y in ys)
        torch.autograd.backward(ys, gy)
        grads[shared] = (ys, x.grad, [w.grad.clone() for w in ws])
        for w in ws:
            w.grad = None
    (ys0, gx0, gw0), (ys1, gx1, gw1) = grads[False], grads[True]
    assert all(torch.equal(a, b) for a, b in zip(ys0, ys1))          # same bf16 outputs
    assert gx1.dtype == torch.float32
    torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-6)       # fp32 sum of the three (order aside)
    assert all(torch.equal(a, b) for a, b in zip(gw0, gw1))
    # Saved for backward besides the weights: 3 input copies + 3 bf16 weight casts -> 1 input copy + 3.
    assert len(saved[False]) - len(saved[True]) == 2


def test_no_autocast_or_same_dtype_is_the_input_itself():
    x = torch.randn(4, 8, dtype=torch.float64)
    assert all(t is x for t in autocast_once(x, 3))
    xb = torch.randn(4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(t is xb for t in autocast_once(xb, 2))


def test_swiglu_under_autocast_equals_autograd_of_the_plain_form_and_keeps_less():
    from draft_trainer.model.layers import SwiGLU

    torch.manual_seed(0)
    mlp = SwiGLU(48, 96)
    x0, gy = torch.randn(2, 30, 48), torch.randn(2, 30, 48)
    out = {}
    for fused in (False, True):
        x = x0.clone().requires_grad_()

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = x * 1.0
                if fused:
                    return mlp(h)
                return mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(h)) * mlp.up_proj(h))

        ptrs, y = _saved_storages(run)
        y.backward(gy)
        out[fused] = (y, x.grad, [p.grad.clone() for p in mlp.parameters()], len(ptrs))
        mlp.zero_grad(set_to_none=True)
    (y0, gx0, gw0, n0), (y1, gx1, gw1, n1) = out[False], out[True]
    assert y1.dtype == torch.bfloat16 and torch.equal(y0, y1)
    assert torch.equal(gx0, gx1) and all(torch.equal(a, b) for a, b in zip(gw0, gw1))   # same ops, same dtypes
    assert n1 < n0      # silu(a), the product and down's bf16 weight are not kept


def test_rmsnorm_equals_autograd_of_the_formula_bit_for_bit_and_keeps_less():
    from draft_trainer.model.layers import RMSNorm

    def formula(m, x):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        return m.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + m.eps)).to(x.dtype)

    for dt in (torch.bfloat16, torch.float32, torch.float64):
        torch.manual_seed(0)
        m = RMSNorm(64, 1e-5).to(torch.float64 if dt == torch.float64 else torch.float32)
        with torch.no_grad():
            m.weight.mul_(torch.randn(64, dtype=m.weight.dtype))
        x0, gy = torch.randn(3, 50, 64).to(dt) * 3, torch.randn(3, 50, 64, dtype=m.weight.dtype)
        res = []
        for f in (formula, lambda m, x: m(x)):
            x = x0.clone().requires_grad_()
            ptrs, y = _saved_storages(lambda: f(m, x * 1.0))
            y.backward(gy)
            res.append((y.detach(), x.grad, m.weight.grad.clone(), len(ptrs)))
            m.weight.grad = None
        (y0, gx0, gw0, n0), (y1, gx1, gw1, n1) = res
        assert torch.equal(y0, y1) and torch.equal(gx0, gx1) and torch.equal(gw0, gw1), dt
        if dt == torch.bfloat16:
            assert n1 < n0          # no fp32 copy of x, no normed copy
    # A frozen input (the embeddings): no input gradient, the weight's is still right.
    m, e = RMSNorm(8, 1e-6), torch.randn(5, 8)
    m(e).sum().backward()
    torch.testing.assert_close(m.weight.grad, (e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-6)).sum(0))
