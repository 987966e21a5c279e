"""DFlash's drafter for the lossless evaluator: one draft forward proposes a whole block.

Legend (shapes): S committed positions with target features, F = L*H features of one position,
H hidden, K block length this round (<= block_size), V target vocabulary.

State: the projected context (`hidden_norm(fc(features))`, per position, so caching it is exact)
of every committed position whose target features are known, and the anchor: the last committed
token (the target's own bonus token), at position S, whose features come with the next round.
propose(k): the block [anchor, mask x (K-1)] at positions S..S+K-1, K = min(k + 1, block_size),
sees the whole context; positions 1..K-1 through the target's lm_head give K-1 greedy drafts.
The context keys/values are recomputed per round (SGLang keeps them in its KV cache: same values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.cpu_linear import linear_fn
from draft_trainer.methods.dflash.model import DFlashDraft


class DFlashDrafter:
    """A `Drafter` (draft_trainer/methods/base.py)."""

    name = "dflash"

    def __init__(self, draft: DFlashDraft, embed_VH: torch.Tensor, head_VH: torch.Tensor) -> None:
        self.draft = draft
        self.feature_layers = tuple(draft.cfg.target_layer_ids)
        self.embed_VH, self.head_VH = embed_VH, head_VH
        # the target's vocabulary head over the block's rows, in the draft's dtype; an fp32 one packed
        # once for oneDNN (common/cpu_linear.py: 5 rows of SmolLM2's head 11 ms instead of 27 on 2 AVX2 cores)
        self.head = linear_fn(head_VH.to(next(draft.parameters()).dtype))
        self.ctx_SH: torch.Tensor | None = None
        self.anchor: int | None = None

    @torch.no_grad()
    def _extend(self, feats_nF: torch.Tensor, tokens: list[int]) -> None:
        new_nH = self.draft.project_context(feats_nF[None])[0]
        self.ctx_SH = new_nH if self.ctx_SH is None else torch.cat([self.ctx_SH, new_nH])
        self.anchor = int(tokens[-1])

    def start(self, prompt, first_token: int, feats_SF: torch.Tensor) -> None:
        self.ctx_SH = None  # a new sequence
        self._extend(feats_SF, list(prompt[1:]) + [first_token])

    def propose(self, max_tokens: int, min_confidence: float = 0.0) -> list[int]:
        return self.propose_tree(max_tokens, 1, min_confidence)[0]

    @torch.no_grad()
    def propose_tree(self, max_tokens: int, width: int,
                     min_confidence: float = 0.0) -> tuple[list[int], list[list[int]]]:
        """The block's top-1 tokens and, per position, its next width - 1 (alternatives, decode.py)."""
        k = max_tokens
        d = self.draft
        K = max(2, min(k + 1, d.cfg.block_size))
        S = self.ctx_SH.shape[0]
        ids_K = torch.full((K,), d.cfg.mask_token_id, dtype=torch.long)
        ids_K[0] = self.anchor
        noise_1KH = F.embedding(ids_K, self.embed_VH)[None]
        pos_q_1K = torch.arange(S, S + K)[None]
        visible_1KS = torch.ones(1, K, S, dtype=torch.bool)
        h_1KH = d.forward_projected(self.ctx_SH[None], noise_1KH, torch.arange(S)[None], pos_q_1K, visible_1KS, K)
        logits_KV = self.head(h_1KH[0, 1:])
        drafts = logits_KV.argmax(-1).tolist()[:k]
        if min_confidence > 0:  # the block's prefix whose product of top-1 probabilities stays above it
            conf_K = logits_KV[:k].float().softmax(-1).amax(-1).cumprod(0)
            drafts = drafts[: int((conf_K >= min_confidence).sum())]
        alts = logits_KV[: len(drafts)].topk(width, dim=-1).indices[:, 1:].tolist() if width > 1 else []
        return drafts, alts

    def extend(self, tokens, feats_SF: torch.Tensor) -> None:
        self._extend(feats_SF, list(tokens))
