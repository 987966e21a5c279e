"""LK losses (draft_trainer/model/objective.py) against a direct, slow implementation of the
paper's formulas (one row, one vocabulary entry at a time, autograd on scalars), in values and
gradients; the fused one-pass form against the autograd form; and the fused EAGLE-3 TTT loss
with an LK objective against the reference TTT loss (dense and top-k teachers)."""

import math

import pytest
import torch

from draft_trainer.data.vocab import build_vocab_mapping
from draft_trainer.methods.eagle3.fused_loss import fused_ttt_loss, row_teacher_from_hidden, row_teacher_from_topk
from draft_trainer.methods.eagle3.losses import teacher_from_hidden, teacher_from_topk, ttt_loss
from draft_trainer.model.objective import LK_EPS, Objective, objective_rows, objective_rows_inplace
from draft_trainer.model.tensors import shift_left
from tests.support.eagle3 import padded_inputs, random_draft, tiny_cfg

KINDS = ["kl", "lk_alpha", "lk_lambda"]


def slow_row(z, p, kind, eta):
    """The formulas written out for one row: z logits (a 1-D tensor requiring grad), p a list of
    target probabilities (floats). a = sum_v min(p_v, q_v); KL = sum_{p_v > 0} p_v log(p_v / q_v)."""
    V = z.shape[0]
    m = float(z.detach().max())
    expz = [torch.exp(z[v] - m) for v in range(V)]
    Z = sum(expz)
    q = [e / Z for e in expz]
    a = sum(torch.minimum(q[v], torch.tensor(p[v], dtype=z.dtype)) for v in range(V))
    ce = -sum(p[v] * torch.log(q[v]) for v in range(V) if p[v] > 0)
    if kind == "kl":
        return ce
    if kind == "lk_alpha":
        return -torch.log(a + LK_EPS)
    kl = sum(p[v] * (math.log(p[v]) - torch.log(q[v])) for v in range(V) if p[v] > 0)
    lam = math.exp(-eta * float(a))
    return lam * kl + (1 - lam) * (1 - a)


def rows(seed=0, c=6, V=17, K=4):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(c, V, generator=g, dtype=torch.float64) * 2
    p = torch.softmax(torch.randn(c, V, generator=g, dtype=torch.float64) * 2, -1)
    p[0] = torch.softmax(z[0] + 0.05 * torch.randn(V, generator=g, dtype=torch.float64), -1)  # a near-match row
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(c)])
    pk = torch.softmax(torch.randn(c, K, generator=g, dtype=torch.float64), -1)
    pk[1, -1] = 0.0                                               # an id dropped from the draft vocab
    return z, p, ids, pk


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "topk"])
def test_autograd_form_equals_the_slow_formula(kind, sparse):
    z, p, ids, pk = rows(seed=1)
    obj = Objective(kind, eta=3.0)
    p_dense = torch.zeros_like(p).scatter_(-1, ids, pk) if sparse else p
    zz = z.clone().requires_grad_()
    if sparse:
        loss, _, _ = objective_rows(zz, obj, ids_cK=ids, pk_cK=pk)
    else:
        loss, _, _ = objective_rows(zz, obj, p_cV=p)
    (g_fast,) = torch.autograd.grad(loss.sum(), zz)
    for r in range(z.shape[0]):
        zr = z[r].clone().requires_grad_()
        want = slow_row(zr, p_dense[r].tolist(), kind, 3.0)
        (g_slow,) = torch.autograd.grad(want, zr)
        torch.testing.assert_close(loss[r], want.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_fast[r], g_slow, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["lk_alpha", "lk_lambda"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "topk"])
def test_fused_form_equals_autograd(kind, sparse):
    z, p, ids, pk = rows(seed=2, c=9, V=31, K=5)
    obj = Objective(kind, eta=2.5)
    zz = z.clone().requires_grad_()
    kw = dict(ids_cK=ids, pk_cK=pk) if sparse else dict(p_cV=p)
    want, logq, a = objective_rows(zz, obj, **kw)
    (g_want,) = torch.autograd.grad(want.sum(), zz)
    zbuf = z.clone()
    got, amax, got_a = objective_rows_inplace(zbuf, obj, **kw)
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_a, a.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zbuf, g_want, rtol=1e-10, atol=1e-12)   # the gradient is left in z
    assert torch.equal(amax, z.argmax(-1))


def test_lambda_blend_limits_and_acceptance_gradient():
    """eta -> 0 gives KL (the soft CE's gradient), eta -> inf gives TV = 1 - a; a's gradient
    pushes q up exactly where q < p."""
    z, p, _, _ = rows(seed=3)
    zz = z.clone().requires_grad_()
    kl_loss, _, _ = objective_rows(zz, Objective("kl"), p_cV=p)
    (g_kl,) = torch.autograd.grad(kl_loss.sum(), zz)
    small, _, _ = objective_rows(zz, Objective("lk_lambda", eta=1e-9), p_cV=p)
    (g_small,) = torch.autograd.grad(small.sum(), zz)
    torch.testing.assert_close(g_small, g_kl, rtol=1e-7, atol=1e-9)
    big, _, a = objective_rows(zz, Objective("lk_lambda", eta=1e4), p_cV=p)
    torch.testing.assert_close(big, 1 - a, rtol=1e-9, atol=1e-9)
    q = torch.softmax(z, -1)
    assert float((1 - a).min()) > 0 and torch.allclose(a.detach(), torch.minimum(p, q).sum(-1))


def test_objective_refuses_unknown_kind_and_bad_eta():
    with pytest.raises(ValueError, match="lk_beta.*kl"):
        Objective("lk_beta")
    with pytest.raises(ValueError, match="eta"):
        Objective("lk_lambda", eta=0.0)


def ttt_case(seed=0):
    cfg = tiny_cfg(draft_vocab_size=30)
    model = random_draft(cfg, seed)
    aux, ids, am = padded_inputs(cfg, [13, 9, 5], seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    vocab = build_vocab_mapping(torch.randint(0, 50, (cfg.vocab_size,), generator=g), cfg.draft_vocab_size)
    model.set_vocab_mapping(vocab.d2t, vocab.t2d)
    head_VH = torch.randn(cfg.vocab_size, cfg.target_hidden_size, generator=g, dtype=torch.float64) * 0.8
    teacher_BTH = torch.randn(*ids.shape, cfg.target_hidden_size, generator=g, dtype=torch.float64)
    loss_mask = (torch.rand(ids.shape, generator=g) > 0.3).long() * am
    g_steps = [x.detach().requires_grad_() for x in model.ttt_forward(aux, shift_left(ids, 1), 4, am)]
    return model, vocab, head_VH, teacher_BTH, loss_mask, g_steps


def grads_of(model, g_steps, loss):
    return torch.autograd.grad(loss, [*g_steps, model.lm_head.weight, model.norm.weight])


@pytest.mark.parametrize("kind", ["lk_alpha", "lk_lambda"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "topk"])
def test_fused_ttt_loss_equals_reference_with_lk(kind, sparse):
    model, vocab, head_VH, teacher_BTH, loss_mask, g_steps = ttt_case(seed=4)
    obj = Objective(kind, eta=3.0)
    if sparse:
        lp, tk = torch.log_softmax(teacher_BTH @ head_VH.T, -1).topk(6, dim=-1)
        ref_t = teacher_from_topk(tk, lp, vocab.t2d, vocab.target_to_draft, loss_mask)
        new_t = row_teacher_from_topk(tk, lp, vocab.t2d, vocab.target_to_draft, loss_mask)
    else:
        ref_t = teacher_from_hidden(teacher_BTH, head_VH, vocab.used, vocab.t2d, loss_mask)
        new_t = row_teacher_from_hidden(teacher_BTH, head_VH, vocab.used, vocab.t2d, loss_mask, chunk=7)
    ref_loss, ref_stats = ttt_loss(model, g_steps, ref_t, obj)
    new_loss, new_stats = fused_ttt_loss(model, g_steps, new_t, chunk=5, objective=obj)
    kl_loss, _ = ttt_loss(model, g_steps, ref_t)
    assert abs(float(ref_loss) - float(kl_loss)) > 1e-3          # the objective really changed the loss
    tol = dict(rtol=1e-6, atol=1e-7) if sparse else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(new_loss, ref_loss.to(new_loss.dtype), **tol)
    for a, b in zip(grads_of(model, g_steps, new_loss), grads_of(model, g_steps, ref_loss)):
        torch.testing.assert_close(a, b.to(a.dtype), **tol)
    assert new_stats.positions == ref_stats.positions and sum(ref_stats.positions) > 0
    for name in ("loss", "acc", "cond_acc", "exp_acc"):
        torch.testing.assert_close(torch.tensor(getattr(new_stats, name)), torch.tensor(getattr(ref_stats, name)),
                                   msg=name, **tol)


def step_case(lengths=(20, 14, 6), supervised=0.25):
    from draft_trainer.data.batch import Batch

    cfg = tiny_cfg(draft_vocab_size=50)
    model = random_draft(cfg, dtype=torch.float32)
    vocab = build_vocab_mapping(torch.arange(cfg.vocab_size) % 7, cfg.draft_vocab_size)
    model.set_vocab_mapping(vocab.d2t, vocab.t2d)
    aux, ids, am = padded_inputs(cfg, list(lengths), dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    teacher = torch.randn(*ids.shape, cfg.target_hidden_size, generator=g)
    loss_mask = (torch.rand(ids.shape, generator=g) > supervised).float() * am
    head = torch.randn(cfg.vocab_size, cfg.target_hidden_size, generator=torch.Generator().manual_seed(1))
    batch = Batch(list(range(len(lengths))), ids, loss_mask, am, aux, teacher_BTH=teacher)
    return model, (model, batch, head, vocab.used, vocab.t2d, vocab.target_to_draft, 4)


@pytest.mark.parametrize("kind", ["lk_alpha", "lk_lambda"])
def test_train_step_fused_equals_reference_with_lk(kind):
    from draft_trainer.methods.eagle3.step import train_step

    model, args = step_case()
    out = {}
    for impl in ("reference", "fused"):
        model.zero_grad()
        loss, stats = train_step(*args, impl=impl, precision="fp32", objective=Objective(kind))
        loss.backward()
        out[impl] = (loss, stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (rl, rs, rg), (fl, fs, fg) = out["reference"], out["fused"]
    torch.testing.assert_close(fl.float(), rl.float(), rtol=1e-5, atol=1e-6)
    assert fs.positions == rs.positions and fs.acc == rs.acc and rg.keys() == fg.keys()
    for n in rg:
        torch.testing.assert_close(fg[n], rg[n], rtol=1e-4, atol=1e-6, msg=n)


def test_lk_with_nothing_supervised_is_zero_not_an_error():
    from draft_trainer.methods.eagle3.step import train_step

    model, args = step_case(supervised=1.1)   # no supervised token at all
    loss, stats = train_step(*args, precision="fp32", objective=Objective("lk_lambda"))
    assert float(loss.detach()) == 0.0 and sum(stats.positions) == 0
