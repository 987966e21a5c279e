"""EAGLE-3 targets, losses and metrics (reference implementation).

Legend (shapes): B batch, T sequence length, H target hidden, V target vocab, Vd draft vocab,
K TTT steps.

Alignment. `loss_mask_BT[t] = 1` says token t is supervised (assistant content). The target's
distribution at position j predicts token j+1, so "position j is worth learning" is
`loss_mask[j+1]` (`pred_mask`). Step k of TTT at position t reads token t+1+k and learns the
target distribution at position t+1+k; everything it needs is the step-0 tensor shifted left by
1+k (zero past the end, so padded tails carry no loss).

Loss. Soft cross-entropy against the target distribution renormalised over the draft vocab,
`p = softmax(z[..., used])`, at positions whose full-vocab target argmax is in the draft vocab.
Each step's loss is divided by its number of supervised positions (not by B*T: padding must
not dilute the loss), and the total is `sum_k 0.8^k L_k`. `model.loss=lk_alpha|lk_lambda`
replaces the soft cross-entropy by an LK loss (draft_trainer/model/objective.py).

Metrics (per step k, over that step's supervised positions):
  acc_k       draft argmax (mapped to target ids) == target full-vocab argmax
  cond_acc_k  acc_k given steps 0..k-1 were all right at the same start position
  exp_acc_k   sum_v min(p_v, q_v): acceptance probability under sampling
  sim_accept_len = 1 + sum_k prod_{j<=k} cond_acc_j = 1 + sum_k P(steps 0..k all right): tokens
                   per target forward of a greedy K-token chain draft (the 1 is the token the
                   target adds itself). Conditional, not plain, accuracies: a chain stops at the
                   first miss, so plain accuracies of later steps overstate acceptance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draft_trainer.model.objective import KL, Objective, objective_rows
from draft_trainer.model.stats import StepStats, sim_accept_len
from draft_trainer.model.tensors import acc_dtype, shift_left

STEP_WEIGHT_DECAY = 0.8  # the loss weight of TTT step k is 0.8**k


@dataclass
class Teacher:
    """Step-0 targets at every position (shifted per step by `for_step`)."""

    p_BTVd: torch.Tensor | None          # target distribution over the draft vocab (dense teacher)
    top_BT: torch.Tensor                 # target full-vocab argmax (target ids)
    mask_BT: torch.Tensor                # float: supervised and argmax inside the draft vocab
    topk_ids_BTK: torch.Tensor | None = None       # draft-vocab ids of the server's top-k (sparse teacher)
    topk_p_BTK: torch.Tensor | None = None         # renormalised probabilities of those ids

    def for_step(self, k: int) -> "Teacher":
        n = 1 + k
        return Teacher(
            p_BTVd=None if self.p_BTVd is None else shift_left(self.p_BTVd, n),
            top_BT=shift_left(self.top_BT, n, fill=-1),
            mask_BT=shift_left(self.mask_BT, n),
            topk_ids_BTK=None if self.topk_ids_BTK is None else shift_left(self.topk_ids_BTK, n),
            topk_p_BTK=None if self.topk_p_BTK is None else shift_left(self.topk_p_BTK, n),
        )


@torch.no_grad()
def teacher_from_hidden(teacher_BTH: torch.Tensor, target_head_VH: torch.Tensor, used_Vd: torch.Tensor,
                        t2d_V: torch.Tensor, loss_mask_BT: torch.Tensor, chunk: int = 2048) -> Teacher:
    """Dense teacher from the target's final normed hidden state and its frozen lm_head.

    Full-vocab logits are computed `chunk` tokens at a time, only to take the argmax; the
    distribution is computed over the draft vocab only ([.., Vd], never [.., V] for the batch).
    """
    B, T, H = teacher_BTH.shape
    flat_NH = teacher_BTH.reshape(-1, H).to(target_head_VH.dtype)
    top = torch.empty(flat_NH.shape[0], dtype=torch.long, device=flat_NH.device)
    for s in range(0, flat_NH.shape[0], chunk):
        top[s : s + chunk] = (flat_NH[s : s + chunk] @ target_head_VH.T).argmax(-1)
    head_VdH = target_head_VH[used_Vd]
    p_BTVd = torch.softmax((flat_NH @ head_VdH.T).to(acc_dtype(flat_NH.dtype)), dim=-1).view(B, T, -1)
    top_BT = top.view(B, T)
    pred_mask_BT = shift_left(loss_mask_BT.float(), 1)
    mask_BT = pred_mask_BT * t2d_V[top_BT].float()
    return Teacher(p_BTVd=p_BTVd, top_BT=top_BT, mask_BT=mask_BT)


@torch.no_grad()
def teacher_from_topk(topk_ids_BTK: torch.Tensor, topk_logprobs_BTK: torch.Tensor, t2d_V: torch.Tensor,
                      target_to_draft_V: torch.Tensor, loss_mask_BT: torch.Tensor) -> Teacher:
    """Sparse teacher from server-side top-k log-probs (ids are target ids, sorted by log-prob).

    Ids outside the draft vocab are dropped and the rest renormalised, as in the dense case.
    """
    ids = topk_ids_BTK.long()
    in_draft = t2d_V[ids]
    p = topk_logprobs_BTK.float().exp() * in_draft
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-20)
    top_BT = ids[..., 0]
    pred_mask_BT = shift_left(loss_mask_BT.float(), 1)
    mask_BT = pred_mask_BT * t2d_V[top_BT].float()
    draft_ids = torch.where(in_draft, target_to_draft_V[ids], torch.zeros_like(ids))
    return Teacher(p_BTVd=None, top_BT=top_BT, mask_BT=mask_BT, topk_ids_BTK=draft_ids, topk_p_BTK=p)


def step_loss(logits_BTVd: torch.Tensor, t: Teacher, objective: Objective = KL) -> tuple[torch.Tensor, torch.Tensor]:
    """(the objective summed over supervised positions, log-softmax) for one TTT step."""
    B, T, Vd = logits_BTVd.shape
    if t.p_BTVd is not None:
        loss_N, logq_N, _ = objective_rows(logits_BTVd.reshape(B * T, Vd), objective, p_cV=t.p_BTVd.reshape(B * T, Vd))
    else:
        K = t.topk_ids_BTK.shape[-1]
        loss_N, logq_N, _ = objective_rows(logits_BTVd.reshape(B * T, Vd), objective,
                                           ids_cK=t.topk_ids_BTK.reshape(B * T, K), pk_cK=t.topk_p_BTK.reshape(B * T, K))
    return (loss_N.view(B, T) * t.mask_BT).sum(), logq_N.view(B, T, Vd)


def ttt_loss(model, g_steps: list[torch.Tensor], teacher: Teacher,
             objective: Objective = KL) -> tuple[torch.Tensor, StepStats]:
    """Weighted TTT loss over the step outputs of `ttt_forward`, plus per-step metrics."""
    total = g_steps[0].new_zeros((), dtype=torch.float32)
    stats = StepStats()
    all_right_BT = None
    for k, g_BTh in enumerate(g_steps):
        t = teacher.for_step(k)
        n = t.mask_BT.sum()
        ce_sum, logq = step_loss(model.logits(g_BTh), t, objective)
        loss_k = ce_sum / n.clamp_min(1.0)
        total = total + (STEP_WEIGHT_DECAY ** k) * loss_k
        with torch.no_grad():
            right_BT = (model.draft_to_target(logq.argmax(-1)) == t.top_BT) & (t.mask_BT > 0)
            prev = torch.ones_like(right_BT) if all_right_BT is None else all_right_BT
            all_right_BT = prev & right_BT
            denom = float(n)
            stats.loss.append(float(loss_k))
            stats.acc.append(float(right_BT.sum()) / max(denom, 1.0))
            cond_den = float((prev & (t.mask_BT > 0)).sum())
            stats.cond_acc.append(float(all_right_BT.sum()) / max(cond_den, 1.0))
            if t.p_BTVd is not None:
                ea_BT = torch.minimum(t.p_BTVd, logq.exp()).sum(-1)
            else:
                ea_BT = torch.minimum(t.topk_p_BTK, logq.exp().gather(-1, t.topk_ids_BTK)).sum(-1)
            stats.exp_acc.append(float((ea_BT * t.mask_BT).sum()) / max(denom, 1.0))
            stats.positions.append(int(denom))
            stats.add_step(denom, float(ce_sum), float(right_BT.sum()), float(all_right_BT.sum()), cond_den,
                           float((ea_BT * t.mask_BT).sum()))
    stats.sim_accept_len = sim_accept_len(stats.cond_acc)
    return total, stats
