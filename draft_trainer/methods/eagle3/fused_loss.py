"""Memory-efficient TTT loss: the fast path, equal to `losses.ttt_loss` (the reference).

Legend (shapes): B batch, T sequence length, H target hidden, h draft hidden, V target vocab,
Vd draft vocab, K top-k width, R supervised teacher rows, N draft rows over all TTT steps,
c a chunk of rows.

Why it is cheap:
- The teacher is kept only at supervised rows (`RowTeacher`): position j of sample b is a row
  when token j+1 is supervised and the target's argmax at j is inside the draft vocab. Its
  distribution is computed once per row with one full-vocab matmul per chunk (the argmax and the
  draft-vocab columns come from the same logits) and reused by every TTT step: step k at
  position t reads row (b, t+1+k). No shifted copies, no [B,T,V] tensor.
- The draft's lm_head, log-softmax, soft cross-entropy and their gradients run chunk by chunk
  inside one autograd function (`LinearSoftCE`): the gradient w.r.t. the logits is known in the
  forward pass (w * (q * sum(p) - p)), so each chunk's [c,Vd] logits are turned into dx/dW at
  once and dropped. Only dx [N,h] and dW [Vd,h] are kept for backward, never K x [B,T,Vd].
- Rows where nothing is supervised (user turns, padding, the TTT tail) are never computed.
- Matmuls run in `compute_dtype` (bf16 on CPUs with bf16 support; fp32 master weights), the
  softmax and the loss in fp32 (fp64 when the inputs are fp64, for exactness tests).
On CUDA the per-row softmax/loss/gradient runs in a Triton kernel (kernels/soft_ce.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draft_trainer.methods.eagle3.losses import STEP_WEIGHT_DECAY
from draft_trainer.model.kernels.select import soft_ce_backend
from draft_trainer.model.objective import KL, Objective, neg_entropy_rows, objective_rows_inplace
from draft_trainer.model.stats import StepStats, sim_accept_len
from draft_trainer.model.tensors import acc_dtype, rowsum, shift_left

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
class RowTeacher:
    """Step-0 teacher at supervised rows only (see the module docstring)."""

    b_R: torch.Tensor                      # int64 sample index of each row
    j_R: torch.Tensor                      # int64 position of each row (target distribution at j)
    top_R: torch.Tensor                    # int64 target full-vocab argmax (target ids)
    T: int
    p_RVd: torch.Tensor | None = None      # dense: target distribution over the draft vocab
    topk_ids_RK: torch.Tensor | None = None  # sparse: draft-vocab ids of the server's top-k
    topk_p_RK: torch.Tensor | None = None    # sparse: their renormalised probabilities

    def rows_for_step(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher row ids, flat draft positions b*T + t) of TTT step k: t = j - 1 - k >= 0."""
        r = torch.nonzero(self.j_R >= 1 + k).squeeze(1)
        return r, self.b_R[r] * self.T + self.j_R[r] - 1 - k


def _candidate_rows(loss_mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions j whose next token is supervised (the target distribution at j predicts it)."""
    pred_BT = shift_left(loss_mask_BT.float(), 1) > 0
    b, j = torch.nonzero(pred_BT, as_tuple=True)
    return b, j


@torch.no_grad()
def row_teacher_from_hidden(teacher_BTH: torch.Tensor, target_head_VH: torch.Tensor, used_Vd: torch.Tensor,
                            t2d_V: torch.Tensor, loss_mask_BT: torch.Tensor, compute_dtype: torch.dtype | None = None,
                            chunk: int = 256) -> RowTeacher:
    """Dense teacher from the final normed hidden state and the frozen target lm_head."""
    B, T, H = teacher_BTH.shape
    cdt = compute_dtype or target_head_VH.dtype
    acc = acc_dtype(teacher_BTH.dtype)
    b, j = _candidate_rows(loss_mask_BT)
    rows_RH = teacher_BTH[b, j]
    W_VH = target_head_VH.to(cdt)
    R = rows_RH.shape[0]
    top = torch.empty(R, dtype=torch.long, device=teacher_BTH.device)
    # Stored in the compute dtype when that is bf16/fp16 (half the memory traffic per step).
    p_dtype = cdt if cdt in (torch.bfloat16, torch.float16) else acc
    p = torch.empty(R, used_Vd.numel(), dtype=p_dtype, device=teacher_BTH.device)
    sl = cpu_slice_rows() // 2 if teacher_BTH.device.type == "cpu" else chunk   # [sl, V] logits stay in L2
    for s in range(0, R, chunk):
        z_cV = rows_RH[s : s + chunk].to(cdt) @ W_VH.T
        for a in range(0, z_cV.shape[0], sl):
            z_sV = z_cV[a : a + sl]
            o, e = s + a, s + a + z_sV.shape[0]
            top[o:e] = z_sV.max(-1).indices     # (argmax on bf16 is ~4x slower on CPU)
            z_sVd = z_sV.index_select(1, used_Vd)
            p[o:e] = torch.softmax(z_sVd.to(acc) if p_dtype == acc else z_sVd, dim=-1)
    keep = t2d_V[top]
    return RowTeacher(b_R=b[keep], j_R=j[keep], top_R=top[keep], T=T, p_RVd=p[keep])


@torch.no_grad()
def row_teacher_from_topk(topk_ids_BTK: torch.Tensor, topk_logprobs_BTK: torch.Tensor, t2d_V: torch.Tensor,
                          target_to_draft_V: torch.Tensor, loss_mask_BT: torch.Tensor) -> RowTeacher:
    """Sparse teacher from server-side top-k log-probs (target ids, sorted by log-prob).

    Ids outside the draft vocab are dropped and the rest renormalised, as in the dense case.
    """
    T = topk_ids_BTK.shape[1]
    b, j = _candidate_rows(loss_mask_BT)
    ids_RK = topk_ids_BTK[b, j].long()
    in_draft = t2d_V[ids_RK]
    p = topk_logprobs_BTK[b, j].float().exp() * in_draft
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-20)
    top = ids_RK[:, 0]
    keep = t2d_V[top]
    draft_ids = torch.where(in_draft, target_to_draft_V[ids_RK], torch.zeros_like(ids_RK))
    return RowTeacher(b_R=b[keep], j_R=j[keep], top_R=top[keep], T=T, topk_ids_RK=draft_ids[keep],
                      topk_p_RK=p[keep])


# ----------------------------------------------------------------------------- per-row soft CE

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


def _soft_ce_rows(z, p=None, ids=None, pk=None, obj: Objective = KL, negH=None, pz=None):
    if not obj.is_kl:  # LK losses (model/objective.py): the same one-pass form, torch on every device
        return objective_rows_inplace(z, obj, p, ids, pk, negH)
    if p is not None and soft_ce_backend(z.device) == "triton":
        from draft_trainer.model.kernels.soft_ce import soft_ce_rows_triton  # lazy: triton only on GPU

        return soft_ce_rows_triton(z, p)
    return soft_ce_rows_torch(z, p, ids, pk, pz)


def _teacher_dots(teacher: RowTeacher, W_Vdh: torch.Tensor, x_Nh: torch.Tensor, r_N: torch.Tensor,
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
    def forward(ctx, x_Nh, W_Vdh, teacher: RowTeacher, r_N, w_N, compute_dtype, chunk: int, obj: Objective = KL,
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
            dW = torch.zeros(Vd, h, dtype=cdt, device=x.device)
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
                pz_N = _teacher_dots(teacher, W, x, r_N, G)
            for gs in range(0, N, G):
                ge = min(N, gs + G)
                zg = torch.mm(x[gs:ge].to(cdt), W.T, out=zbuf[: ge - gs])
                for s in range(gs, ge, c):
                    e = min(ge, s + c)
                    z = zg[s - gs : e - gs]
                    r = r_N[s:e]
                    if dense:
                        p = torch.index_select(p_R, 0, r, out=pbuf[: e - s])
                        out = _soft_ce_rows(z, p=p, obj=obj, negH=None if negH_R is None else negH_R[r],
                                            pz=None if pz_N is None else pz_N[s:e])
                    else:
                        out = _soft_ce_rows(z, ids=teacher.topk_ids_RK[r], pk=teacher.topk_p_RK[r], obj=obj)
                    ce[s:e], amax[s:e], ea[s:e] = out
                w_g = w_acc[gs:ge, None]
                dx[gs:ge] = (zg @ W).to(acc) * w_g
                dW.addmm_(zg.T, (x[gs:ge] * w_g).to(cdt))
            # The logits buffer and the bf16 W copy go before dW's fp32 copy is made: with them alive
            # that cast was the step's peak RSS (~100 MB more at Vd=32k).
            zbuf = zg = z = p = pbuf = W = None  # noqa: F841
            dW = dW.to(acc)
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
        return (dx.mul_(grad_loss).to(ctx.dtypes[0]), dW.mul_(grad_loss).to(ctx.dtypes[1]),
                None, None, None, None, None, None, None)


def fused_ttt_loss(model, g_steps: list[torch.Tensor], teacher: RowTeacher,
                   compute_dtype: torch.dtype | None = None, chunk: int | None = None,
                   normalizers: list[float] | None = None, objective: Objective = KL,
                   group_rows: int = GROUP_ROWS) -> tuple[torch.Tensor, StepStats]:
    """Weighted TTT loss `sum_k 0.8^k L_k` and per-step metrics (same definitions as `ttt_loss`).

    `objective` is the per-position loss (model/objective.py): soft cross-entropy, or an LK loss.

    `normalizers[k]` replaces step k's own supervised-position count as the divisor of its loss:
    the trainer passes counts summed over micro-batches and ranks, so that the gradient of a
    global batch does not depend on how it is split (FSDP averages gradients over ranks).
    """
    B, T, h = g_steps[0].shape
    if chunk is None:       # softmax/CE slice: cache-sized on CPU; one per matmul group elsewhere (kernel launches)
        chunk = cpu_slice_rows() if g_steps[0].device.type == "cpu" else group_rows
    rows, flat_pos, weights, counts = [], [], [], []
    for k, g_BTh in enumerate(g_steps):
        r, pos = teacher.rows_for_step(k)
        n = r.numel()
        rows.append(r)
        flat_pos.append(pos)
        counts.append(n)
        denom = normalizers[k] if normalizers is not None else n
        weights.append(torch.full((n,), (STEP_WEIGHT_DECAY ** k) / max(denom, 1), dtype=torch.float64,
                                  device=r.device))
    x_Nh = model.norm(torch.cat([g.reshape(B * T, h)[pos] for g, pos in zip(g_steps, flat_pos)]))
    r_N, w_N = torch.cat(rows), torch.cat(weights)
    loss, ce_N, amax_N, ea_N = LinearSoftCE.apply(x_Nh, model.lm_head.weight, teacher, r_N, w_N, compute_dtype, chunk,
                                                  objective, group_rows)
    stats = _step_stats(model, teacher, rows, flat_pos, counts, ce_N, amax_N, ea_N, B * T)
    return loss, stats


@torch.no_grad()
def _step_stats(model, teacher, rows, flat_pos, counts, ce_N, amax_N, ea_N, BT) -> StepStats:
    stats = StepStats()
    right_N = model.draft_to_target(amax_N) == teacher.top_R[torch.cat(rows)]
    all_right = torch.ones(BT, dtype=torch.bool, device=right_N.device)
    s = 0
    for r, pos, n in zip(rows, flat_pos, counts):
        right, ce, ea = right_N[s : s + n], ce_N[s : s + n], ea_N[s : s + n]
        s += n
        prev = all_right[pos]
        chain = prev & right
        all_right = torch.zeros_like(all_right)
        all_right[pos] = chain           # positions without a row at this step break the chain
        stats.loss.append(float(ce.sum()) / max(n, 1))
        stats.acc.append(float(right.sum()) / max(n, 1))
        stats.cond_acc.append(float(chain.sum()) / max(int(prev.sum()), 1))
        stats.exp_acc.append(float(ea.sum()) / max(n, 1))
        stats.positions.append(n)
        stats.add_step(n, float(ce.sum()), float(right.sum()), float(chain.sum()), float(prev.sum()), float(ea.sum()))
    stats.sim_accept_len = sim_accept_len(stats.cond_acc)
    return stats

