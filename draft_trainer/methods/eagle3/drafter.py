"""EAGLE-3's drafter for the lossless evaluator (the Drafter protocol, methods/base.py): chain drafting with the draft's KV
cache, extended from the target's real aux features after each verification.

Legend (shapes): S positions, H target hidden, h draft hidden, 3H = the three aux layers' outputs.

The draft's cache holds positions 0..n-1 of the committed sequence x_0..x_n, built from real
target features: position p reads f_p (fc of the aux features) and emb(x_{p+1}), exactly as in
training and in SGLang's draft-extend. `g_last` is the draft's hidden output at n-1, which
already predicts d_1. Drafting step j (2..K) feeds emb(d_{j-1}) and the previous step's hidden
output at position n-2+j; those speculative entries are dropped at the next extension.

Speed: the drafter decodes with `_FastDraft`, an fp32 copy of the draft's inference path with q|k|v
and gate|up fused into one matmul each (the same math as `Eagle3Draft.project/step/logits`, which
stay the reference: tests/unit/test_eagle3_fast_drafter.py, tests/integration/test_eval_drafters.py).
On this CPU a one-row bf16 matmul of these sizes costs 1.5-4x the fp32 one, cold or warm in cache,
and a round's draft work is a few such rows; the weights are the export's values, upcast exactly.
Measured on the 20-minute demo draft (bf16 target, K=2): 5.9 -> 4.6 ms of draft work per round,
1.21x -> 1.25x plain greedy (benchmarks/results/spec_loop_fused_drafter_w1.md). Its weights are
packed once for oneDNN (common/cpu_linear.py::linear_fn): on the AVX2 EPYC, 2 threads, a K=5 proposal
of the demo's draft took 11.0 ms instead of 15.7 with torch's linears (docs/notes/issue-20.md, session 24).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from common.cpu_linear import linear_fn
from draft_trainer.methods.eagle3.model import Eagle3Draft, KVCache
from draft_trainer.model.layers import apply_rope


class _ModelPath:
    """The draft model's own inference methods behind `_FastDraft`'s interface: the reference the
    fast path is checked and measured against (`Eagle3Drafter(..., fast=False)`), in the draft's dtype."""

    def __init__(self, draft: Eagle3Draft) -> None:
        self.draft = draft
        self.project, self.step, self.feed, self.logits = draft.project, draft.step, draft.feed, draft.logits

    def embed(self, tokens: list[int]) -> torch.Tensor:
        return self.draft.embed_tokens(torch.tensor([tokens]))


class _FastDraft:
    """The draft's one-sequence decoding path in fp32, fused (module doc). Reads the draft's weights
    once; `embed_tokens` (the target's, large) stays in its dtype and only the rows looked up are cast."""

    def __init__(self, draft: Eagle3Draft) -> None:
        f32 = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731
        ml, attn = draft.midlayer, draft.midlayer.self_attn
        self.draft = draft
        self.nh, self.nkv, self.d = attn.nh, attn.nkv, attn.d
        self.eps = ml.input_layernorm.eps
        self.ffn = ml.mlp.gate_proj.weight.shape[0]
        self.fc_norm_3H = [f32(n.weight) for n in draft.fc_norm] if draft.fc_norm is not None else None
        # fp32 weights packed once for oneDNN (common/cpu_linear.py): a 1-row step reads each once
        self.fc = linear_fn(f32(draft.fc.weight))
        self.norm_in, self.norm_hid = f32(ml.input_layernorm.weight), f32(ml.hidden_norm.weight)
        self.qkv = linear_fn(f32(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])))
        self.o = linear_fn(f32(attn.o_proj.weight))
        self.norm_post = f32(ml.post_attention_layernorm.weight)
        self.gate_up = linear_fn(f32(torch.cat([ml.mlp.gate_proj.weight, ml.mlp.up_proj.weight])))
        self.down = linear_fn(f32(ml.mlp.down_proj.weight))
        self.norm_out, self.head = f32(draft.norm.weight), linear_fn(f32(draft.lm_head.weight))
        self.norm_output = draft.cfg.norm_output

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)

    def embed(self, tokens: list[int]) -> torch.Tensor:
        return self.draft.embed_tokens(torch.tensor([tokens])).to(torch.float32)

    def project(self, aux_1S3H: torch.Tensor) -> torch.Tensor:
        aux_1S3H = aux_1S3H.to(torch.float32)
        if self.fc_norm_3H is not None:
            aux_1S3H = torch.cat([self._rms(a, w) for w, a in zip(self.fc_norm_3H, aux_1S3H.chunk(3, dim=-1))], dim=-1)
        return self.fc(aux_1S3H)

    def step(self, emb_1Th: torch.Tensor, g_1Th: torch.Tensor, pos_1T: torch.Tensor, cache: KVCache) -> torch.Tensor:
        T = g_1Th.shape[1]
        x_1T2h = torch.cat([self._rms(emb_1Th, self.norm_in), self._rms(g_1Th, self.norm_hid)], dim=-1)
        q_1Tx, k_1Tx, v_1Tx = self.qkv(x_1T2h).split([self.nh * self.d, self.nkv * self.d,
                                                                   self.nkv * self.d], dim=-1)
        cos, sin = self.draft.rope(pos_1T, torch.float32)
        q_1nTd = apply_rope(q_1Tx.view(1, T, self.nh, self.d).transpose(1, 2), cos, sin)
        k_1kTd = apply_rope(k_1Tx.view(1, T, self.nkv, self.d).transpose(1, 2), cos, sin)
        k_all, v_all = cache.append(k_1kTd, v_1Tx.view(1, T, self.nkv, self.d).transpose(1, 2))
        S = k_all.shape[2]
        # one query sees the whole cache (no mask); T queries are causal among themselves
        mask_TS = None if T == 1 else torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
        o_1nTd = F.scaled_dot_product_attention(q_1nTd, k_all, v_all, attn_mask=mask_TS, enable_gqa=self.nh != self.nkv)
        g_1Th = g_1Th + self.o(o_1nTd.transpose(1, 2).reshape(1, T, -1))
        gate_1Tf, up_1Tf = self.gate_up(self._rms(g_1Th, self.norm_post)).split(self.ffn, dim=-1)
        return g_1Th + self.down(F.silu(gate_1Tf) * up_1Tf)

    def feed(self, g_1Th: torch.Tensor) -> torch.Tensor:
        return self._rms(g_1Th, self.norm_out) if self.norm_output else g_1Th

    def logits(self, g_1Th: torch.Tensor) -> torch.Tensor:
        return self.head(self._rms(g_1Th, self.norm_out))


class Eagle3Drafter:
    name = "eagle3"

    def __init__(self, draft: Eagle3Draft, fast: bool = True) -> None:
        self.draft = draft
        self.path = _FastDraft(draft) if fast else _ModelPath(draft)   # module doc: Speed
        self.feature_layers = tuple(draft.cfg.aux_layer_ids)
        self.cache = KVCache()
        self.real_len = 0          # cache entries built from real target features
        self.last_token = -1       # x_n
        self.g_last = None         # [1,1,h] the draft's hidden output at position n-1

    @torch.no_grad()
    def start(self, prompt: Sequence[int], first_token: int, feats_S3H: torch.Tensor | None) -> None:
        self.cache = KVCache()
        self.real_len = 0
        self._extend_real(list(prompt[1:]) + [first_token], feats_S3H)

    @torch.no_grad()
    def extend(self, tokens: Sequence[int], feats_S3H: torch.Tensor | None) -> None:
        self.cache.truncate(self.real_len)  # drop the last round's speculative entries
        self._extend_real(list(tokens), feats_S3H)

    def _extend_real(self, tokens: list[int], feats_S3H: torch.Tensor | None) -> None:
        """Positions real_len.. from real features: position p reads f_p and emb(x_{p+1})."""
        if feats_S3H is None or feats_S3H.shape[0] != len(tokens):
            raise ValueError(f"EAGLE-3 drafter: {len(tokens)} tokens need as many feature rows, got "
                             f"{None if feats_S3H is None else tuple(feats_S3H.shape)}")
        f = self.path
        S = len(tokens)
        g_1Sh = f.project(feats_S3H[None])  # EAGLE-3.1: per-layer norms before fc
        pos_1S = torch.arange(self.real_len, self.real_len + S)[None]
        self.g_last = f.step(f.embed(tokens), g_1Sh, pos_1S, self.cache)[:, -1:]
        self.real_len += S
        self.last_token = tokens[-1]

    def propose(self, max_tokens: int, min_confidence: float = 0.0) -> list[int]:
        return self.propose_tree(max_tokens, 1, min_confidence)[0]

    @torch.no_grad()
    def propose_tree(self, max_tokens: int, width: int,
                     min_confidence: float = 0.0) -> tuple[list[int], list[list[int]]]:
        """The chain (top-1 at each step) and, per position, the next width - 1 tokens of the same
        step's logits (alternatives to the chain token there, decode.py)."""
        d, f = self.draft, self.path
        drafts: list[int] = []
        alts: list[list[int]] = []
        prev_tok, g_11h = self.last_token, self.g_last
        confidence = 1.0   # the draft's estimate that every token so far is accepted
        for j in range(max_tokens):
            if j > 0:
                # EAGLE-3.1 feeds the normed output to the next step (feed is the identity for 3)
                g_11h = f.step(f.embed([prev_tok]), f.feed(g_11h), torch.tensor([[self.real_len - 1 + j]]), self.cache)
            logits_11v = f.logits(g_11h)
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
