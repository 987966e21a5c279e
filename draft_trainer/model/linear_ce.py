"""A linear head + cross-entropy against a (soft or hard) target, chunked, gradients in forward.

Legend (shapes): N rows (positions), h input width, Vd the head's vocabulary, R target rows,
K top-k width, c a slice of rows.

`LinearSoftCE` is the memory-efficient loss every draft method shares: sum_n w_n * L(p_{r_n},
softmax(x_n W^T)) with the logits formed group by group and turned into dx/dW at once (the
gradient w.r.t. the logits is known in forward), so no [N, Vd] tensor ever exists. The target of
row n is row r_n of a `RowTargets`-like object (anything with these three attributes):
  p_RVd                     dense distributions over the head's vocabulary (EAGLE-3's teacher), or
  topk_ids_RK, topk_p_RK    sparse: the server's top-k; K=1 with p=1 is a plain label (DFlash).
When W needs no gradient (a frozen target head) its [Vd,h] product is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draft_trainer.model.kernels.select import soft_ce_backend
from draft_trainer.model.objective import KL, Objective, neg_entropy_rows, objective_rows_inplace
from draft_trainer.model.tensors import acc_dtype, rowsum

# Rows per matmul (teacher and draft head): one [group, Vd] logits buffer; see LinearSoftCE.
GROUP_ROWS = 1024
# Rows per softmax/CE slice on a single-threaded CPU: one [16, Vd] bf16 slice (1 MB at Vd=32k) stays
# in L2 through the ~8 passes of `soft_ce_rows_torch`; 256-row slices streamed every pass from L3 and
# were 1.6x slower. With more threads every op is also a fork/join, and on a busy box each one can
# wait a scheduler slice for a core: there the 16x op count lost (0.63x measured), so 256 rows.
CPU_SLICE_ROWS = 16
MULTI_THREAD_SLICE_ROWS = 256


def cpu_slice_rows() -> int:
    return CPU_SLICE_ROWS if torch.get_num_threads() == 1 else MULTI_THREAD_SLICE_ROWS


@dataclass
class RowTargets:
    """Per-row targets of `LinearSoftCE` (see the module docstring); `labels` builds hard ones."""

    p_RVd: torch.Tensor | None = None
    topk_ids_RK: torch.Tensor | None = None
    topk_p_RK: torch.Tensor | None = None

    @classmethod
    def labels(cls, ids_R: torch.Tensor) -> "RowTargets":
        ids_RK = ids_R.long()[:, None]
        return cls(topk_ids_RK=ids_RK, topk_p_RK=torch.ones(ids_RK.shape, dtype=torch.float32, device=ids_R.device))


def soft_ce_rows_torch(z_cVd: torch.Tensor, p_cVd: torch.Tensor | None = None, ids_cK: torch.Tensor | None = None,
                       pk_cK: torch.Tensor | None = None, pz_c: torch.Tensor | None = None):
    """Soft cross-entropy of logits z against a teacher p, per row, in place and in z's dtype.

    Returns (ce_c, argmax_c, exp_acc_c) (reductions in >= fp32) and leaves
    dCE/dz = softmax(z) * sum(p) - p in z. Dense teacher: p_cVd, whose rows are distributions
    (sum 1: then sum_v min(p, q) = 1 - |q - p|_1 / 2 needs no extra [c,Vd] temporary);
    sparse (top-k): ids_cK + pk_cK. Every step is one pass over z: on CPU this part is
    memory-bound, so bf16 z halves its cost next to the bf16 matmuls.
    `pz_c` (dense teacher only): p . z over the unshifted logits when the caller already has it
    (`LinearSoftCE` gets it from one small matmul per teacher row), which saves a pass over z.
    """
    red = acc_dtype(z_cVd.dtype)
    m_c, amax_c = z_cVd.max(-1)
    z_cVd.sub_(m_c[:, None])
    if p_cVd is not None and pz_c is not None:
        pz_c = pz_c.to(red) - m_c.to(red)                   # rows of p sum to 1 (assumed below too)
        sp_c = torch.ones_like(pz_c)
    elif p_cVd is not None:
        # (bmm / vector_norm on bf16 are several times slower on CPU than a temp + fp32-accumulated sum)
        pz_c = rowsum(p_cVd * z_cVd)
        sp_c = torch.ones_like(pz_c)
    else:
        pz_c = (pk_cK.to(red) * z_cVd.gather(-1, ids_cK).to(red)).sum(-1)
        sp_c = pk_cK.to(red).sum(-1)
    z_cVd.exp_()
    se_c = rowsum(z_cVd)
    ce_c = sp_c * se_c.log() - pz_c                         # sum_v p_v (lse - z_v)
    z_cVd.mul_((sp_c / se_c).to(z_cVd.dtype)[:, None])       # q * sum(p)
    if p_cVd is not None:
        z_cVd.sub_(p_cVd)
        ea_c = 1.0 - 0.5 * rowsum(z_cVd.abs())
    else:
        ea_c = torch.minimum(pk_cK.to(red), z_cVd.gather(-1, ids_cK).to(red) / sp_c.clamp_min(1e-30)[:, None]).sum(-1)
        z_cVd.scatter_add_(-1, ids_cK, -pk_cK.to(z_cVd.dtype))
    return ce_c, amax_c, ea_c


def soft_ce_rows(z, p=None, ids=None, pk=None, obj: Objective = KL, negH=None, pz=None):
    if not obj.is_kl:  # LK losses (model/objective.py): the same one-pass form, torch on every device
        return objective_rows_inplace(z, obj, p, ids, pk, negH)
    if p is not None and soft_ce_backend(z.device) == "triton":
        from draft_trainer.model.kernels.soft_ce import soft_ce_rows_triton  # lazy: triton only on GPU

        return soft_ce_rows_triton(z, p)
    return soft_ce_rows_torch(z, p, ids, pk, pz)


def teacher_dots(teacher, W_Vdh: torch.Tensor, x_Nh: torch.Tensor, r_N: torch.Tensor,
                  chunk: int) -> torch.Tensor:
    """p_{r_n} . (x_n W^T) for every row n, as (p_r W) . x_n: one [R,Vd] x [Vd,h] matmul per
    teacher row (each row is read by up to K TTT steps) instead of a pass over every [c,Vd] chunk."""
    red = acc_dtype(x_Nh.dtype)
    p_RVd = teacher.p_RVd
    pW_Rh = torch.zeros(p_RVd.shape[0], W_Vdh.shape[1], dtype=red, device=x_Nh.device)
    for s in range(0, p_RVd.shape[0], chunk):
        pW_Rh[s : s + chunk] = p_RVd[s : s + chunk].to(W_Vdh.dtype) @ W_Vdh
    return (pW_Rh[r_N] * x_Nh.to(W_Vdh.dtype).to(red)).sum(-1)


class LinearSoftCE(torch.autograd.Function):
    """sum_n w_n * CE(p_{r_n}, softmax(x_n W^T)), chunked over rows; grads computed in forward.

    The row weights w are applied on the [c,h] side (dx rows, x rows for dW), never as an extra
    pass over the [c,Vd] logits. The matmuls run on groups of `group_rows` rows, the per-row
    softmax/CE on `chunk`-row slices of a group (small enough to stay in cache on CPU). Each group
    adds one [Vd,h] product to dW, and on CPU that add costs about as much as the matmul itself,
    so fewer, larger groups are faster; the price is one [group_rows, Vd] buffer.
    In bf16, dW is summed in bf16 by the matmul (fp32 inside each product, one rounding per group).
    """

    @staticmethod
    def forward(ctx, x_Nh, W_Vdh, teacher: RowTargets, r_N, w_N, compute_dtype, chunk: int, obj: Objective = KL,
                group_rows: int = GROUP_ROWS):
        with torch.autocast(x_Nh.device.type, enabled=False):
            N, h = x_Nh.shape
            Vd = W_Vdh.shape[0]
            acc = acc_dtype(x_Nh.dtype)
            cdt = compute_dtype or x_Nh.dtype
            W = W_Vdh.detach().to(cdt)
            x = x_Nh.detach()
            dense = teacher.p_RVd is not None
            dx = torch.empty(N, h, dtype=acc, device=x.device)
            # dW accumulates in the matmul's dtype (the add is the matmul's own, fp32 inside): a bf16
            # product per group added to an fp32 dW costs a [Vd,h] copy and an add per group on CPU.
            need_dW = ctx.needs_input_grad[1]   # a frozen head (DFlash reads the target's) needs none
            dW = torch.zeros(Vd, h, dtype=cdt, device=x.device) if need_dW else None
            ce = torch.empty(N, dtype=acc, device=x.device)
            amax = torch.empty(N, dtype=torch.long, device=x.device)
            ea = torch.empty(N, dtype=acc, device=x.device)
            c = min(chunk, max(N, 1))
            G = min(max(N, 1), max(c, group_rows // c * c))      # rows per matmul group, a multiple of c
            zbuf = torch.empty(G, Vd, dtype=cdt, device=x.device)
            pbuf = torch.empty(c, Vd, dtype=cdt, device=x.device) if dense else None
            p_R = teacher.p_RVd.to(cdt) if dense else None
            w_acc = w_N.to(acc)
            negH_R = None   # lk_lambda's KL needs each teacher row's entropy: once per row, not per step
            if dense and obj.kind == "lk_lambda" and teacher.p_RVd.shape[0]:
                negH_R = torch.cat([neg_entropy_rows(teacher.p_RVd[s : s + c].to(cdt))
                                    for s in range(0, teacher.p_RVd.shape[0], c)])
            pz_N = None
            if dense and obj.is_kl and soft_ce_backend(x.device) == "torch" and N:
                pz_N = teacher_dots(teacher, W, x, r_N, G)
            for gs in range(0, N, G):
                ge = min(N, gs + G)
                zg = torch.mm(x[gs:ge].to(cdt), W.T, out=zbuf[: ge - gs])
                for s in range(gs, ge, c):
                    e = min(ge, s + c)
                    z = zg[s - gs : e - gs]
                    r = r_N[s:e]
                    if dense:
                        p = torch.index_select(p_R, 0, r, out=pbuf[: e - s])
                        out = soft_ce_rows(z, p=p, obj=obj, negH=None if negH_R is None else negH_R[r],
                                            pz=None if pz_N is None else pz_N[s:e])
                    else:
                        out = soft_ce_rows(z, ids=teacher.topk_ids_RK[r], pk=teacher.topk_p_RK[r], obj=obj)
                    ce[s:e], amax[s:e], ea[s:e] = out
                w_g = w_acc[gs:ge, None]
                dx[gs:ge] = (zg @ W).to(acc) * w_g
                if need_dW:
                    dW.addmm_(zg.T, (x[gs:ge] * w_g).to(cdt))
            # The logits buffer and the bf16 W copy go before dW's fp32 copy is made: with them alive
            # that cast was the step's peak RSS (~100 MB more at Vd=32k).
            zbuf = zg = z = p = pbuf = W = None  # noqa: F841
            dW = dW.to(acc) if need_dW else None
            loss = (ce * w_acc).sum()
        # Kept as plain attributes (they are results, not inputs): in backward they are then the
        # only references, so autograd adopts dW as lm_head.grad instead of copying [Vd,h].
        ctx.grads = (dx, dW)
        ctx.dtypes = (x_Nh.dtype, W_Vdh.dtype)
        ctx.mark_non_differentiable(ce, amax, ea)
        return loss, ce, amax, ea

    @staticmethod
    def backward(ctx, grad_loss, *_):
        dx, dW = ctx.grads
        ctx.grads = None
        # In place: backward runs once per graph, and a second [Vd,h] copy would be the peak.
        return (dx.mul_(grad_loss).to(ctx.dtypes[0]), None if dW is None else dW.mul_(grad_loss).to(ctx.dtypes[1]),
                None, None, None, None, None, None, None)
