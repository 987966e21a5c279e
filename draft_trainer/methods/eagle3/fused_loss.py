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
  inside one autograd function (`LinearSoftCE`, model/linear_ce.py, shared with other methods): the gradient w.r.t. the logits is known in the
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
from draft_trainer.model.linear_ce import GROUP_ROWS, LinearSoftCE, cpu_slice_rows
from draft_trainer.model.objective import KL, Objective
from draft_trainer.model.stats import StepStats, sim_accept_len
from draft_trainer.model.tensors import acc_dtype, shift_left

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

