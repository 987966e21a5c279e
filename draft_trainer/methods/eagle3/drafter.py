"""EAGLE-3's drafter for the lossless evaluator: chain drafting with a KV cache, as SGLang serves it.

Legend (shapes): S positions, h draft hidden, L*H target features of one position (3H).

Caches: the draft's KV cache holds positions built from *real* target features only (position p
reads f_p and emb(x_{p+1})); positions drafted in a round are dropped after verification and
rebuilt from the target's features of the accepted tokens.
"""

from __future__ import annotations

import torch

from draft_trainer.methods.base import Drafter
from draft_trainer.methods.eagle3.model import Eagle3Draft, KVCache


class Eagle3Drafter(Drafter):
    def __init__(self, draft: Eagle3Draft) -> None:
        self.draft = draft
        self.layer_ids = tuple(draft.cfg.aux_layer_ids)
        self.cache = KVCache()
        self.real_len = 0            # draft cache entries built from real features
        self.g_last = None           # the draft's hidden output at the last real position [1,1,h]
        self.next_tok = None         # the committed token after that position (the target's)

    @torch.no_grad()
    def _extend(self, feats_SLH: torch.Tensor, next_tokens: list[int]) -> None:
        d = self.draft
        S = feats_SLH.shape[0]
        g = d.project(feats_SLH[None])
        emb = d.embed_tokens(torch.tensor([next_tokens[:S]]))
        pos = torch.arange(self.real_len, self.real_len + S)[None]
        self.g_last = d.step(emb, g, pos, self.cache)[:, -1:]
        self.real_len += S
        self.next_tok = next_tokens[S - 1]

    def start(self, feats_SLH: torch.Tensor, tokens: list[int]) -> None:
        self._extend(feats_SLH, tokens)

    @torch.no_grad()
    def propose(self, k: int) -> list[int]:
        d = self.draft
        drafts, prev, g = [], self.next_tok, self.g_last
        for j in range(k):
            if j > 0:
                emb = d.embed_tokens(torch.tensor([[prev]]))
                g = d.step(emb, d.feed(g), torch.tensor([[self.real_len - 1 + j]]), self.cache)
            tok = int(d.draft_to_target(d.logits(g[:, -1:]).argmax(-1))[0, 0])
            drafts.append(tok)
            prev, g = tok, g[:, -1:]
        return drafts

    def accept(self, feats_nLH: torch.Tensor, tokens: list[int]) -> None:
        self.cache.truncate(self.real_len)
        self._extend(feats_nLH, tokens)
