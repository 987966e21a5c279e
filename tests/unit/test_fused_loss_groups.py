"""The speed-ups of the fused loss keep its math: matmuls over groups of rows (any group size gives
the reference's loss, gradients and metrics in fp64; bf16 with many groups stays close), p . z from
one (p W) . x per teacher row, and the teacher argmax taken by max()."""

import pytest
import torch

from draft_trainer.methods.eagle3.fused_loss import RowTeacher, fused_ttt_loss, row_teacher_from_hidden
from draft_trainer.model.linear_ce import LinearSoftCE, soft_ce_rows_torch, teacher_dots
from draft_trainer.methods.eagle3.losses import teacher_from_hidden, ttt_loss
from draft_trainer.model.tensors import shift_left
from tests.unit.test_fused_loss import K, grads_of, setup_case


def _case():
    cfg, model, aux, ids, am, vocab, head_VH, teacher_BTH, loss_mask = setup_case(seed=3, lengths=(17, 11, 6))
    g_steps = [g.detach().requires_grad_() for g in model.ttt_forward(aux, shift_left(ids, 1), K, am)]
    ref_t = teacher_from_hidden(teacher_BTH, head_VH, vocab.used, vocab.t2d, loss_mask)
    new_t = row_teacher_from_hidden(teacher_BTH, head_VH, vocab.used, vocab.t2d, loss_mask, chunk=5)
    return model, g_steps, ref_t, new_t


@pytest.mark.parametrize("chunk,group_rows", [(4, 4), (4, 9), (5, 10), (3, 10_000)])
def test_any_row_grouping_matches_reference_fp64(chunk, group_rows):
    model, g_steps, ref_t, new_t = _case()
    ref_loss, ref_stats = ttt_loss(model, g_steps, ref_t)
    new_loss, new_stats = fused_ttt_loss(model, g_steps, new_t, chunk=chunk, group_rows=group_rows)
    assert sum(new_stats.positions) > 3 * group_rows or group_rows > 1000   # several groups, or one
    torch.testing.assert_close(new_loss, ref_loss.to(new_loss.dtype), rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_of(model, g_steps, new_loss), grads_of(model, g_steps, ref_loss)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for name in ("loss", "acc", "cond_acc", "exp_acc"):
        torch.testing.assert_close(torch.tensor(getattr(new_stats, name)), torch.tensor(getattr(ref_stats, name)),
                                   rtol=1e-9, atol=1e-12, msg=name)


def test_bf16_with_many_groups_stays_close_to_fp64():
    """bf16 matmuls, dW summed in bf16 over 4-row groups: gradients within bf16 rounding of fp64."""
    model, g_steps, ref_t, new_t = _case()
    ref_loss, _ = ttt_loss(model, g_steps, ref_t)
    ref_grads = grads_of(model, g_steps, ref_loss)
    loss, _ = fused_ttt_loss(model, g_steps, new_t, compute_dtype=torch.bfloat16, chunk=4, group_rows=4)
    assert abs(float(loss.detach()) - float(ref_loss)) < 2e-2 * abs(float(ref_loss))
    for a, b in zip(grads_of(model, g_steps, loss), ref_grads):
        if b.norm() > 0:
            assert float((a.double() - b).norm() / b.norm()) < 3e-2


def test_soft_ce_rows_with_given_teacher_dot_equals_the_one_pass_form():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 50, generator=g, dtype=torch.float64) * 3
    p = torch.softmax(torch.randn(6, 50, generator=g, dtype=torch.float64), -1)
    pz = (p * z).sum(-1)
    z_a, z_b = z.clone(), z.clone()
    out_a = soft_ce_rows_torch(z_a, p)
    out_b = soft_ce_rows_torch(z_b, p, pz_c=pz)
    for a, b in zip(out_a, out_b):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z_a, z_b, rtol=0, atol=0)          # the same gradient left in z
    ce_def = torch.logsumexp(z, -1) - pz                            # and the definition
    torch.testing.assert_close(out_b[0], ce_def, rtol=1e-12, atol=1e-12)


def test_teacher_dots_are_p_dot_logits_per_row():
    g = torch.Generator().manual_seed(1)
    R, Vd, h, N = 4, 30, 8, 11
    p = torch.softmax(torch.randn(R, Vd, generator=g, dtype=torch.float64), -1)
    W = torch.randn(Vd, h, generator=g, dtype=torch.float64)
    x = torch.randn(N, h, generator=g, dtype=torch.float64)
    r = torch.randint(0, R, (N,), generator=g)
    t = RowTeacher(b_R=torch.zeros(R, dtype=torch.long), j_R=torch.arange(R), top_R=torch.zeros(R, dtype=torch.long),
                   T=R, p_RVd=p)
    want = (p[r] * (x @ W.T)).sum(-1)
    torch.testing.assert_close(teacher_dots(t, W, x, r, chunk=3), want, rtol=1e-12, atol=1e-12)
    # no teacher rows: an empty result, not an error
    t0 = RowTeacher(b_R=torch.zeros(0, dtype=torch.long), j_R=torch.zeros(0, dtype=torch.long),
                    top_R=torch.zeros(0, dtype=torch.long), T=R, p_RVd=p[:0])
    assert teacher_dots(t0, W, x[:0], r[:0], chunk=3).shape == (0,)


def test_teacher_argmax_is_the_first_maximum():
    """max().indices (faster than argmax on bf16) picks the same token, ties included."""
    H, V = 4, 12
    head = torch.zeros(V, H, dtype=torch.bfloat16)
    head[3, 0] = head[7, 0] = 1.0                       # tokens 3 and 7 tie for every row
    hidden = torch.ones(1, 3, H, dtype=torch.bfloat16)
    used = torch.arange(V)
    t = row_teacher_from_hidden(hidden, head, used, torch.ones(V, dtype=torch.bool), torch.ones(1, 3),
                                compute_dtype=torch.bfloat16)
    assert t.top_R.tolist() == [3, 3]


def test_empty_batch_has_zero_loss():
    W = torch.randn(10, 4, requires_grad=True)
    x = torch.zeros(0, 4, requires_grad=True)
    t = RowTeacher(b_R=torch.zeros(0, dtype=torch.long), j_R=torch.zeros(0, dtype=torch.long),
                   top_R=torch.zeros(0, dtype=torch.long), T=3, p_RVd=torch.zeros(0, 10))
    loss, ce, _, _ = LinearSoftCE.apply(x, W, t, torch.zeros(0, dtype=torch.long), torch.zeros(0), None, 4)
    assert float(loss) == 0.0 and ce.numel() == 0
