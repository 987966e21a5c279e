"""DFlash's training objective: anchor sampling, the block inputs and mask, weighted block CE.

Legend (shapes): B batch, T tokens per sample (padded), N anchors (blocks) per sample, K block
size, Q = N*K block positions, F = L*H target features, H hidden, M supervised block positions,
V target vocabulary.

As SpecForge's `OnlineDFlashModel` (specforge/core/dflash.py) trains it:
  * anchors: per sample, up to `num_anchors` distinct positions a <= T - K with loss_mask[a] = 1,
    drawn uniformly without replacement, sorted; samples with fewer get padding blocks (kept off);
  * block n = [token a_n, mask x (K-1)] at positions a_n .. a_n+K-1;
  * mask: block n sees target features at positions < a_n (the anchor's own features are not
    known yet at inference) and its own K positions both ways; other blocks never;
  * labels: block position k >= 1 predicts token a_n + k; weight = kept * in-bounds * loss_mask
    * exp(-(k - 1) / gamma); the loss is the weighted mean (sum of weights over the global batch).
Two deliberate differences: the anchor count is min(num_anchors, most valid anchors) (SpecForge
takes one fewer), and a batch without a valid anchor gives zero weight instead of an error.
Anchors come from a generator seeded by the batch's sample ids, so a resumed run (or another
rank count) draws the same blocks for the same samples.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from draft_trainer.model.linear_ce import GROUP_ROWS, LinearSoftCE, RowTargets, cpu_slice_rows
from draft_trainer.model.objective import KL, Objective
from draft_trainer.model.stats import StepStats


@dataclass
class BlockTargets:
    anchors_BN: torch.Tensor        # long, anchor positions (0 where not kept)
    keep_BN: torch.Tensor           # bool, block is real
    noise_ids_BQ: torch.Tensor      # long, [anchor, mask, ...] per block
    pos_q_BQ: torch.Tensor          # long, a_n + k
    labels_BNK: torch.Tensor        # long, token a_n + k (clamped in bounds)
    valid_BNK: torch.Tensor         # float 0/1, supervised (k >= 1, in bounds, loss_mask, kept)
    weight_BNK: torch.Tensor        # float, valid * exp(-(k-1)/gamma)


def batch_generator(sample_ids: list[int], seed: int = 0) -> torch.Generator:
    key = ",".join(str(int(s)) for s in sample_ids).encode()
    return torch.Generator().manual_seed((zlib.crc32(key) << 16) ^ seed)


def sample_anchors(loss_mask_BT: torch.Tensor, K: int, num_anchors: int,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors [B, N], keep [B, N]): distinct valid anchor positions, sorted, per sample."""
    B, T = loss_mask_BT.shape
    last = max(T - K, 0)
    valid_BA = loss_mask_BT[:, : last + 1].cpu() > 0.5
    counts_B = valid_BA.sum(1)
    N = max(1, min(num_anchors, int(counts_B.max())))
    # A uniform random order of the valid positions (invalid ones sort last), first N kept.
    r_BA = torch.rand(valid_BA.shape, generator=gen).masked_fill(~valid_BA, 2.0)
    order_BA = r_BA.argsort(dim=1)
    if order_BA.shape[1] < N:
        order_BA = torch.cat([order_BA, order_BA.new_zeros(B, N - order_BA.shape[1])], 1)
    keep_BN = torch.arange(N)[None] < counts_B.clamp(max=N)[:, None]
    anchors_BN = torch.where(keep_BN, order_BA[:, :N], 0)
    # Sort kept anchors (unkept ones, 0, after them).
    anchors_BN = torch.where(keep_BN, anchors_BN, T + 1).sort(dim=1).values
    anchors_BN = torch.where(keep_BN, anchors_BN, 0)
    dev = loss_mask_BT.device
    return anchors_BN.to(dev), keep_BN.to(dev)


def decay_weights(K: int, gamma: float) -> list[float]:
    """Per block position k: 0 for the anchor, exp(-(k-1)/gamma) after it (1 without decay)."""
    return [0.0] + [math.exp(-(k - 1) / gamma) if gamma and gamma > 0 else 1.0 for k in range(1, K)]


def block_targets(input_ids_BT: torch.Tensor, loss_mask_BT: torch.Tensor, anchors_BN: torch.Tensor,
                  keep_BN: torch.Tensor, K: int, mask_token_id: int, gamma: float) -> BlockTargets:
    B, T = input_ids_BT.shape
    N = anchors_BN.shape[1]
    dev = input_ids_BT.device
    k_K = torch.arange(K, device=dev)
    idx_BNK = anchors_BN[..., None] + k_K
    inb_BNK = idx_BNK < T
    safe_BNK = idx_BNK.clamp(max=T - 1)
    labels_BNK = input_ids_BT.gather(1, safe_BNK.view(B, -1)).view(B, N, K)
    lm_BNK = loss_mask_BT.float().gather(1, safe_BNK.view(B, -1)).view(B, N, K)
    valid_BNK = keep_BN[..., None].float() * inb_BNK.float() * (k_K > 0).float() * lm_BNK
    w_K = torch.tensor(decay_weights(K, gamma), device=dev)
    noise_BNK = torch.full((B, N, K), mask_token_id, dtype=torch.long, device=dev)
    noise_BNK[..., 0] = torch.where(keep_BN, labels_BNK[..., 0], mask_token_id)
    return BlockTargets(anchors_BN, keep_BN, noise_BNK.view(B, -1), idx_BNK.view(B, -1), labels_BNK, valid_BNK,
                        valid_BNK * w_K)


def context_visibility(anchors_BN: torch.Tensor, attention_mask_BT: torch.Tensor, K: int) -> torch.Tensor:
    """[B, Q, S] bool: block position q sees context position s iff s < its anchor (and s is real)."""
    S = attention_mask_BT.shape[1]
    s_S = torch.arange(S, device=anchors_BN.device)
    vis_BNS = (s_S < anchors_BN[..., None]) & (attention_mask_BT[:, None, :] > 0)
    return vis_BNS.repeat_interleave(K, dim=1)


def block_loss(hidden_BQH: torch.Tensor, head_VH: torch.Tensor, tg: BlockTargets, normalizer: float | None,
               compute_dtype: torch.dtype | None = None, objective: Objective = KL) -> tuple[torch.Tensor, StepStats]:
    """Weighted loss over the supervised block positions (CE against the label, or an LK loss), and
    per-position (k = 1..K-1) metrics. The full-vocabulary head runs through `LinearSoftCE`: groups
    of rows whose logits become gradients at once, so no [M, V] tensor is kept (at 512 anchors x 16
    positions and V = 49k that tensor alone was ~1.5 GB per sample in fp32, times its softmax)."""
    B, N, K = tg.labels_BNK.shape
    sel_BNK = tg.valid_BNK > 0
    h_MH = hidden_BQH.view(B, N, K, -1)[sel_BNK]
    labels_M = tg.labels_BNK[sel_BNK]
    denom = max(normalizer if normalizer else float(tg.weight_BNK.sum()), 1e-6)
    w_M = tg.weight_BNK[sel_BNK].double() / denom
    chunk = cpu_slice_rows() if h_MH.device.type == "cpu" else GROUP_ROWS
    loss, ce_M, amax_M, ea_M = LinearSoftCE.apply(h_MH, head_VH, RowTargets.labels(labels_M),
                                                  torch.arange(labels_M.numel(), device=labels_M.device), w_M,
                                                  compute_dtype, chunk, objective)
    with torch.no_grad():
        ce_BNK = torch.zeros(B, N, K, device=ce_M.device)
        ce_BNK[sel_BNK] = ce_M.float()
        right_BNK = torch.zeros(B, N, K, device=ce_M.device)
        right_BNK[sel_BNK] = (amax_M == labels_M).float()
        ea_BNK = torch.zeros(B, N, K, device=ce_M.device)
        ea_BNK[sel_BNK] = ea_M.float()   # q(label): a one-hot target's acceptance
        stats = block_stats(tg.valid_BNK, ce_BNK, right_BNK, ea_BNK)
    return loss, stats


def block_stats(valid_BNK, ce_BNK, right_BNK, ea_BNK) -> StepStats:
    """Position k (k = 1..K-1) of each block: n, CE, right, right with all of 1..k-1 right
    (chain), blocks whose 1..k-1 were right (prev), expected acceptance. An unsupervised position
    inside a block ends its chain (it cannot be credited)."""
    ok_BNK = right_BNK * valid_BNK
    prefix_BNK = torch.cumprod(torch.cat([torch.ones_like(ok_BNK[..., :2]), ok_BNK[..., 1:-1]], -1), -1)
    st = StepStats()
    for k in range(1, valid_BNK.shape[-1]):
        v, p = valid_BNK[..., k], prefix_BNK[..., k]
        st.add_step(float(v.sum()), float(ce_BNK[..., k].sum()), float(ok_BNK[..., k].sum()),
                    float((ok_BNK[..., k] * p).sum()), float((v * p).sum()), float((ea_BNK[..., k] * v).sum()))
    return StepStats.from_sums(st.sums)
