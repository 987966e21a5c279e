"""The memory-efficient loss (fused_loss.py) equals the reference (losses.ttt_loss): loss value,
gradients, and every per-step metric, for the dense and the top-k teacher, with padding,
unsupervised spans and teacher argmaxes outside the draft vocabulary."""

import pytest
import torch

from draft_trainer.data.vocab import build_vocab_mapping
from draft_trainer.model.tensors import shift_left
from draft_trainer.methods.eagle3.fused_loss import fused_ttt_loss, row_teacher_from_hidden, row_teacher_from_topk
from draft_trainer.methods.eagle3.losses import teacher_from_hidden, teacher_from_topk, ttt_loss
from draft_trainer.model.stats import sim_accept_len
from tests.support.eagle3 import padded_inputs, random_draft, tiny_cfg

K = 4


def setup_case(seed=0, lengths=(13, 9, 5)):
    cfg = tiny_cfg(draft_vocab_size=30)
    model = random_draft(cfg, seed)
    aux, ids, am = padded_inputs(cfg, list(lengths), seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    H = cfg.target_hidden_size
    counts = torch.randint(0, 50, (cfg.vocab_size,), generator=g)
    vocab = build_vocab_mapping(counts, cfg.draft_vocab_size)
    model.set_vocab_mapping(vocab.d2t, vocab.t2d)
    head_VH = torch.randn(cfg.vocab_size, H, generator=g, dtype=torch.float64) * 0.8
    teacher_BTH = torch.randn(*ids.shape, H, generator=g, dtype=torch.float64)
    loss_mask = (torch.rand(ids.shape, generator=g) > 0.3).long() * am   # unsupervised spans + padding
    return cfg, model, aux, ids, am, vocab, head_VH, teacher_BTH, loss_mask


def grads_of(model, g_steps, loss):
    params = [model.lm_head.weight, model.norm.weight]
    return torch.autograd.grad(loss, [*g_steps, *params])


@pytest.mark.parametrize("chunk", [7, 512])
def test_dense_teacher_matches_reference(chunk):
    cfg, model, aux, ids, am, vocab, head_VH, teacher_BTH, loss_mask = setup_case()
    draft_ids = shift_left(ids, 1)
    g_steps = [g.detach().requires_grad_() for g in model.ttt_forward(aux, draft_ids, K, am)]
    ref_t = teacher_from_hidden(teacher_BTH, head_VH, vocab.used, vocab.t2d, loss_mask)
    ref_loss, ref_stats = ttt_loss(model, g_steps, ref_t)
    new_t = row_teacher_from_hidden(teacher_BTH, head_VH, vocab.used, vocab.t2d, loss_mask, chunk=chunk)
    # Some target argmaxes fall outside the draft vocab: those rows must be dropped in both.
    assert 0 < new_t.top_R.numel() < int(shift_left(loss_mask, 1).sum())
    new_loss, new_stats = fused_ttt_loss(model, g_steps, new_t, chunk=chunk)
    torch.testing.assert_close(new_loss, ref_loss.to(new_loss.dtype), rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_of(model, g_steps, new_loss), grads_of(model, g_steps, ref_loss)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert new_stats.positions == ref_stats.positions and sum(ref_stats.positions) > 0
    for name in ("loss", "acc", "cond_acc", "exp_acc"):
        torch.testing.assert_close(torch.tensor(getattr(new_stats, name)), torch.tensor(getattr(ref_stats, name)),
                                   rtol=1e-9, atol=1e-12, msg=name)
    assert new_stats.sim_accept_len == pytest.approx(ref_stats.sim_accept_len)


def test_topk_teacher_matches_reference():
    cfg, model, aux, ids, am, vocab, head_VH, teacher_BTH, loss_mask = setup_case(seed=5)
    logp = torch.log_softmax(teacher_BTH @ head_VH.T, -1)
    lp, tk = logp.topk(6, dim=-1)
    g_steps = [g.detach().requires_grad_() for g in model.ttt_forward(aux, shift_left(ids, 1), K, am)]
    ref_t = teacher_from_topk(tk, lp, vocab.t2d, vocab.target_to_draft, loss_mask)
    ref_loss, ref_stats = ttt_loss(model, g_steps, ref_t)
    new_t = row_teacher_from_topk(tk, lp, vocab.t2d, vocab.target_to_draft, loss_mask)
    new_loss, new_stats = fused_ttt_loss(model, g_steps, new_t, chunk=5)
    torch.testing.assert_close(new_loss, ref_loss.to(new_loss.dtype), rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_of(model, g_steps, new_loss), grads_of(model, g_steps, ref_loss)):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-7)
    for name in ("acc", "cond_acc", "exp_acc"):
        torch.testing.assert_close(torch.tensor(getattr(new_stats, name)), torch.tensor(getattr(ref_stats, name)),
                                   rtol=1e-5, atol=1e-7, msg=name)


def test_metrics_on_a_hand_built_case():
    """acc vs conditional acc vs simulated acceptance length on a case worked out by hand."""
    # Chain of 3 steps at 4 start positions; per step, which starts are right:
    #   step0: T T T F   step1: T F T T   step2: F F T T
    # acc = 3/4, 3/4, 2/4; cond_acc = 3/3, 2/3 (starts 0,2), 1/2 (start 2 only)
    cond = [1.0, 2 / 3, 1 / 2]
    assert sim_accept_len(cond) == pytest.approx(1 + 1 + 2 / 3 + 1 / 3)
    assert sim_accept_len([0.0, 1.0]) == 1.0


def test_perfect_draft_gets_full_metrics():
    """A draft whose logits equal the teacher's: acc = cond_acc = 1, sim length = 1 + K, exp_acc = 1,
    loss = the teacher's entropy."""
    H, V = 24, 97
    cfg = tiny_cfg(hidden_size=H, num_attention_heads=3, num_key_value_heads=1, vocab_size=V, draft_vocab_size=V)
    model = random_draft(cfg, 0)
    vocab = build_vocab_mapping(torch.ones(V, dtype=torch.long), V)       # every token in the draft vocab
    model.set_vocab_mapping(vocab.d2t, vocab.t2d)
    g = torch.Generator().manual_seed(0)
    head_VH = torch.randn(V, H, generator=g, dtype=torch.float64)
    with torch.no_grad():
        model.norm.weight.fill_(1.0)
        model.lm_head.weight.copy_(head_VH)
    t_BTH = torch.randn(2, 12, H, generator=g, dtype=torch.float64)
    t_BTH = t_BTH / t_BTH.pow(2).mean(-1, keepdim=True).add(model.norm.eps).sqrt()   # RMSNorm is ~identity
    mask = torch.ones(2, 12, dtype=torch.long)
    teacher = row_teacher_from_hidden(t_BTH, head_VH, vocab.used, vocab.t2d, mask)
    # Step k at t must reproduce the teacher at t+1+k.
    g_steps = [shift_left(t_BTH, 1 + k) for k in range(K)]
    loss, stats = fused_ttt_loss(model, g_steps, teacher)
    assert stats.positions == [2 * (12 - 2 - k) for k in range(K)]
    assert stats.acc == [1.0] * K and stats.cond_acc == [1.0] * K
    assert stats.sim_accept_len == pytest.approx(1.0 + K)
    assert all(e == pytest.approx(1.0) for e in stats.exp_acc)
    p0 = teacher.p_RVd[teacher.j_R >= 1]                                   # the rows step 0 reads
    ent = -(p0 * p0.log()).sum(-1).mean()
    assert stats.loss[0] == pytest.approx(float(ent), rel=1e-6)
