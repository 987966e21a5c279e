"""Per-position training objectives between a target distribution p and a draft distribution q.

Legend (shapes): c rows (positions), V vocabulary the draft predicts over, K top-k width.
The target p is either dense (`p_cV`, rows sum to 1) or sparse (`ids_cK` + `pk_cK`: the
server's top-k, zero elsewhere). q = softmax(z) of the draft's logits z.

  kl         soft cross-entropy CE(p, q) = -sum_v p_v log q_v (KL(p||q) plus the target's entropy,
             a constant: the gradient is KL's). What EAGLE-3 trains on.
  lk_alpha   -log(a + eps), a = sum_v min(p_v, q_v): a is the probability that a token sampled
             from q is accepted by speculative sampling against p (= 1 - TV(p, q)).
  lk_lambda  l * KL(p||q) + (1 - l) * (1 - a), l = exp(-eta * a) with a not differentiated:
             KL's strong gradient while the draft is far from the target, TV (the acceptance
             objective) as it gets close.
The LK losses are from Samarin et al., "LK Losses: Direct Acceptance Rate Optimization for
Speculative Decoding" (arXiv 2602.23881).

Two implementations of the same formulas, for any draft method:
- `objective_rows` is autograd over log-softmax (readable; reference losses use it);
- `objective_rows_inplace` is the fused form: one pass over a chunk of logits returning the
  per-row value and leaving dL/dz in z (no autograd graph over [c,V]). With m_v = [q_v < p_v]
  and s = sum_v m_v q_v, da/dz = q * (m - s); dKL/dz = q * sum(p) - p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draft_trainer.model.tensors import acc_dtype, rowsum

OBJECTIVES = ("kl", "lk_alpha", "lk_lambda")
LK_EPS = 1e-6  # lk_alpha: -log(a + eps) stays finite when the draft gives the target's support no mass


@dataclass(frozen=True)
class Objective:
    kind: str = "kl"
    eta: float = 3.0      # lk_lambda's l = exp(-eta * a)

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective {self.kind!r} is not one of {list(OBJECTIVES)}")
        if not self.eta > 0:
            raise ValueError(f"lk_lambda eta must be > 0, got {self.eta}")

    @property
    def is_kl(self) -> bool:
        return self.kind == "kl"


KL = Objective()


def objective_rows(logits_cV: torch.Tensor, obj: Objective, p_cV: torch.Tensor | None = None,
                   ids_cK: torch.Tensor | None = None, pk_cK: torch.Tensor | None = None):
    """(loss per row [c], log q [c,V], acceptance a per row [c]); differentiable through autograd."""
    logq = torch.log_softmax(logits_cV.to(acc_dtype(logits_cV.dtype)), dim=-1)
    if p_cV is not None:
        p, logq_p, q_p = p_cV.to(logq.dtype), logq, None
    else:
        p, logq_p = pk_cK.to(logq.dtype), logq.gather(-1, ids_cK)
    q_p = logq_p.exp()
    ce = -(p * logq_p).sum(-1)
    a = torch.minimum(p, q_p).sum(-1)
    if obj.kind == "kl":
        return ce, logq, a
    if obj.kind == "lk_alpha":
        return -torch.log(a + LK_EPS), logq, a
    kl = ce + torch.special.xlogy(p, p).sum(-1)
    lam = torch.exp(-obj.eta * a.detach())
    return lam * kl + (1 - lam) * (1 - a), logq, a


def neg_entropy_rows(p_cV: torch.Tensor) -> torch.Tensor:
    """sum_v p_v log p_v per row (>= fp32): KL(p||q) = CE(p, q) + this."""
    return rowsum(torch.special.xlogy(p_cV, p_cV))


def objective_rows_inplace(z_cV: torch.Tensor, obj: Objective, p_cV: torch.Tensor | None = None,
                           ids_cK: torch.Tensor | None = None, pk_cK: torch.Tensor | None = None,
                           negH_c: torch.Tensor | None = None):
    """Fused form of `objective_rows`: returns (loss_c, argmax_c, a_c) (>= fp32) and leaves
    dloss/dz in z (in z's dtype). `obj.kind == "kl"` is served by the soft-CE kernels instead.
    `negH_c`: the rows' `neg_entropy_rows(p)` when the caller has it (a teacher row is shared by
    every TTT step: computed once, not once per step)."""
    red = acc_dtype(z_cV.dtype)
    dense = p_cV is not None
    m_c, amax_c = z_cV.max(-1)
    z_cV.sub_(m_c[:, None])
    if dense:
        pz_c = rowsum(p_cV * z_cV)
        sp_c = torch.ones_like(pz_c)
        if obj.kind == "lk_lambda" and negH_c is None:
            negH_c = neg_entropy_rows(p_cV)
    else:
        pk = pk_cK.to(red)
        pz_c = (pk * z_cV.gather(-1, ids_cK).to(red)).sum(-1)
        sp_c = pk.sum(-1)
        negH_c = torch.special.xlogy(pk, pk).sum(-1) if obj.kind == "lk_lambda" else None
    z_cV.exp_()
    se_c = rowsum(z_cV)
    z_cV.mul_((1.0 / se_c).to(z_cV.dtype)[:, None])          # z is now q
    ce_c = sp_c * se_c.log() - pz_c
    if dense:
        below_cV = z_cV < p_cV
        qm_cV = z_cV * below_cV                                # q where q < p (the slope of min(p, q))
        s_c = rowsum(qm_cV)
        a_c = rowsum(torch.minimum(z_cV, p_cV))
    else:
        q_cK = z_cV.gather(-1, ids_cK).to(red)
        m_cK = q_cK < pk
        s_c = (q_cK * m_cK).sum(-1)
        a_c = torch.minimum(q_cK, pk).sum(-1)
    # grad = A (q sum(p) - p) + B q (m - s): A weighs KL's gradient, B the acceptance's.
    if obj.kind == "lk_alpha":
        A_c = torch.zeros_like(a_c)
        B_c = -1.0 / (a_c + LK_EPS)
        loss_c = -torch.log(a_c + LK_EPS)
    else:
        lam_c = torch.exp(-obj.eta * a_c)
        A_c, B_c = lam_c, lam_c - 1.0
        loss_c = lam_c * (ce_c + negH_c) + (1.0 - lam_c) * (1.0 - a_c)
    dt = z_cV.dtype
    z_cV.mul_((A_c * sp_c - B_c * s_c).to(dt)[:, None])
    if dense:
        z_cV.addcmul_(qm_cV, B_c.to(dt)[:, None])
        z_cV.addcmul_(p_cV.to(dt), A_c.to(dt)[:, None], value=-1.0)
    else:
        upd_cK = B_c[:, None] * q_cK * m_cK - A_c[:, None] * pk
        z_cV.scatter_add_(-1, ids_cK, upd_cK.to(dt))
    return loss_c, amax_c, a_c
