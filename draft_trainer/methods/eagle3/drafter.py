"""EAGLE-3's drafter for the lossless evaluator (the Drafter protocol, methods/base.py): chain drafting with the draft's KV
cache, extended from the target's real aux features after each verification.

Legend (shapes): S positions, H target hidden, h draft hidden, 3H = the three aux layers' outputs.

The draft's cache holds positions 0..n-1 of the committed sequence x_0..x_n, built from real
target features: position p reads f_p (fc of the aux features) and emb(x_{p+1}), exactly as in
training and in SGLang's draft-extend. `g_last` is the draft's hidden output at n-1, which
already predicts d_1. Drafting step j (2..K) feeds emb(d_{j-1}) and the previous step's hidden
output at position n-2+j; those speculative entries are dropped at the next extension.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from draft_trainer.methods.eagle3.model import Eagle3Draft, KVCache


class Eagle3Drafter:
    name = "eagle3"

    def __init__(self, draft: Eagle3Draft) -> None:
        self.draft = draft
        self.feature_layers = tuple(draft.cfg.aux_layer_ids)
        self.cache = KVCache()
        self.real_len = 0          # cache entries built from real target features
        self.last_token = -1       # x_n
        self.g_last = None         # [1,1,h] the draft's hidden output at position n-1

    def start(self, prompt: Sequence[int], first_token: int, feats_S3H: torch.Tensor | None) -> None:
        self.cache = KVCache()
        self.real_len = 0
        self._extend_real(list(prompt[1:]) + [first_token], feats_S3H)

    def extend(self, tokens: Sequence[int], feats_S3H: torch.Tensor | None) -> None:
        self.cache.truncate(self.real_len)  # drop the last round's speculative entries
        self._extend_real(list(tokens), feats_S3H)

    def _extend_real(self, tokens: list[int], feats_S3H: torch.Tensor | None) -> None:
        """Positions real_len.. from real features: position p reads f_p and emb(x_{p+1})."""
        if feats_S3H is None or feats_S3H.shape[0] != len(tokens):
            raise ValueError(f"EAGLE-3 drafter: {len(tokens)} tokens need as many feature rows, got "
                             f"{None if feats_S3H is None else tuple(feats_S3H.shape)}")
        d = self.draft
        S = len(tokens)
        g_1Sh = d.project(feats_S3H[None])  # EAGLE-3.1: per-layer norms before fc
        emb_1Sh = d.embed_tokens(torch.tensor([tokens]))
        pos_1S = torch.arange(self.real_len, self.real_len + S)[None]
        self.g_last = d.step(emb_1Sh, g_1Sh, pos_1S, self.cache)[:, -1:]
        self.real_len += S
        self.last_token = tokens[-1]

    def propose(self, max_tokens: int, min_confidence: float = 0.0) -> list[int]:
        return self.propose_tree(max_tokens, 1, min_confidence)[0]

    def propose_tree(self, max_tokens: int, width: int,
                     min_confidence: float = 0.0) -> tuple[list[int], list[list[int]]]:
        """The chain (top-1 at each step) and, per position, the next width - 1 tokens of the same
        step's logits (alternatives to the chain token there, decode.py)."""
        d = self.draft
        drafts: list[int] = []
        alts: list[list[int]] = []
        prev_tok, g_11h = self.last_token, self.g_last
        confidence = 1.0   # the draft's estimate that every token so far is accepted
        for j in range(max_tokens):
            if j > 0:
                emb_11h = d.embed_tokens(torch.tensor([[prev_tok]]))
                # EAGLE-3.1 feeds the normed output to the next step (feed is the identity for 3)
                g_11h = d.step(emb_11h, d.feed(g_11h), torch.tensor([[self.real_len - 1 + j]]), self.cache)
            logits_11v = d.logits(g_11h)
            if min_confidence > 0:
                confidence *= float(logits_11v.float().softmax(-1).max())
                if confidence < min_confidence:
                    break
            if width > 1:
                top_w = d.draft_to_target(logits_11v.topk(width, dim=-1).indices)[0, 0].tolist()
                prev_tok = top_w[0]
                alts.append(top_w[1:])
            else:
                prev_tok = int(d.draft_to_target(logits_11v.argmax(-1))[0, 0])
            drafts.append(prev_tok)
        return drafts, alts
