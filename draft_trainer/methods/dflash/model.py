"""The DFlash draft: a few non-causal decoder layers that fill a whole block of tokens in one forward.

Legend (shapes): B batch, S context positions (target features), N blocks per sample, K block
size, H hidden (draft = target width), F = L*H concatenated target-layer features, n query heads,
g key/value heads, d head dim, M supervised block positions, V target vocabulary, R block positions in
one attention chunk, X keys of a chunk (its visible context columns + R).

Each block is [anchor token, mask x (K-1)] at positions anchor..anchor+K-1 (embedded with the
target's frozen embedding). Every draft layer's attention keys/values are the projected target
context (`hidden_norm(fc(features))`, the same for every layer, not re-normed) followed by the
block's own positions; a block sees context strictly before its anchor and all of its own block
(bidirectional), never another block. The output hidden states go through the target's lm_head.
The module names/keys are those SGLang's `DFlashDraftModel.load_weights` and the reference HF
class read (export.py writes them unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from draft_trainer.methods.dflash.config import DFlashConfig
from draft_trainer.model.layers import RMSNorm, SwiGLU, apply_rope, autocast_once


# Query rows per attention call: chunks of whole blocks whose keys are [visible context | the chunk's
# own blocks]. Larger chunks mean fewer calls and context copies, but every query also scores the
# chunk's other blocks (masked): S + R keys instead of S + K. One layer's forward + backward at T=512,
# 512 anchors, 1 thread (shared box): 1.5 s at 128-256 rows, 1.7 at 512, 1.9 at 1,024 (3.0 s with dense scores).
CHUNK_ROWS = 256


@dataclass
class BlockChunks:
    """The block positions cut into chunks of whole blocks, built once per forward for every layer.
    Chunk i covers rows spans[i] = (r0, r1) and the context columns [0, ctx_len[i]) (past the last column
    any of its rows sees, every column is masked for all of them, so dropping it changes nothing);
    masks[i] is its SDPA mask [B, 1, r1 - r0, ctx_len[i] + r1 - r0]: the rows' context visibility, then
    block-diagonal over the chunk's own blocks (a block sees all of its K positions, no other block)."""

    spans: list[tuple[int, int]]
    ctx_len: list[int]
    masks: list[torch.Tensor]


def block_chunks(ctx_visible_BQS: torch.Tensor, K: int, rows: int = CHUNK_ROWS) -> BlockChunks:
    B, Q, S = ctx_visible_BQS.shape
    if Q % K:
        raise ValueError(f"{Q} block positions are not whole blocks of {K}: pass the block size the queries use")
    step = max(1, rows // K) * K
    cols_S = torch.arange(1, S + 1, device=ctx_visible_BQS.device)
    spans = [(r0, min(Q, r0 + step)) for r0 in range(0, Q, step)]
    # One host sync for all chunks: the last visible context column + 1 of each chunk.
    seen_S = torch.stack([ctx_visible_BQS[:, r0:r1].any(1).any(0) for r0, r1 in spans])
    ctx_len = (seen_S * cols_S).amax(1).tolist() if S else [0] * len(spans)
    masks = []
    for (r0, r1), s in zip(spans, ctx_len):
        blk_R = torch.arange(r1 - r0, device=ctx_visible_BQS.device) // K
        own_RR = (blk_R[:, None] == blk_R[None]).expand(B, -1, -1)
        masks.append(torch.cat([ctx_visible_BQS[:, r0:r1, :s], own_RR], -1)[:, None])
    return BlockChunks(spans, ctx_len, masks)


class DFlashAttention(nn.Module):
    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__()
        self.n, self.g, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.n * self.d, bias=False)
        self.k_proj = nn.Linear(H, self.g * self.d, bias=False)
        self.v_proj = nn.Linear(H, self.g * self.d, bias=False)
        self.o_proj = nn.Linear(self.n * self.d, H, bias=False)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)

    def _heads(self, x_BTX: torch.Tensor, heads: int) -> torch.Tensor:
        return x_BTX.view(*x_BTX.shape[:-1], heads, self.d).transpose(1, 2)   # [B, heads, T, d]

    def forward(self, x_BQH: torch.Tensor, ctx_BSH: torch.Tensor, rope_q, rope_s, chunks: BlockChunks) -> torch.Tensor:
        """Queries: the Q = N*K block positions; keys: the context positions they see + their own block.
        One fused SDPA call per chunk (on CPU the flash kernel: it keeps only the output and the
        log-sum-exp for backward, not the [Q, S + K] probabilities), key/value heads shared by the
        query heads of their group (no repeated copies)."""
        B, Q, _ = x_BQH.shape
        xq_BQH, xk_BQH, xv_BQH = autocast_once(x_BQH, 3)   # one low-precision copy kept, not one per linear
        ck_BSH, cv_BSH = autocast_once(ctx_BSH, 2)
        q_BnQd = apply_rope(self.q_norm(self._heads(self.q_proj(xq_BQH), self.n)), *rope_q)
        kc_BgSd = apply_rope(self.k_norm(self._heads(self.k_proj(ck_BSH), self.g)), *rope_s)
        vc_BgSd = self._heads(self.v_proj(cv_BSH), self.g)
        kb_BgQd = apply_rope(self.k_norm(self._heads(self.k_proj(xk_BQH), self.g)), *rope_q)
        vb_BgQd = self._heads(self.v_proj(xv_BQH), self.g)
        # split, not slicing: a slice's backward writes its gradient into a zero-filled copy of the
        # whole tensor, once per chunk; split's backward is one concatenation.
        rows = [r1 - r0 for r0, r1 in chunks.spans]
        outs = []
        for q_BnRd, kb_BgRd, vb_BgRd, s, mask in zip(q_BnQd.split(rows, 2), kb_BgQd.split(rows, 2),
                                                      vb_BgQd.split(rows, 2), chunks.ctx_len, chunks.masks):
            k_BgXd = torch.cat([kc_BgSd[:, :, :s], kb_BgRd], 2)
            v_BgXd = torch.cat([vc_BgSd[:, :, :s], vb_BgRd], 2)
            o_BnRd = F.scaled_dot_product_attention(q_BnRd, k_BgXd, v_BgXd, attn_mask=mask, scale=self.d ** -0.5,
                                                    enable_gqa=self.n != self.g)
            outs.append(o_BnRd.transpose(1, 2))
        out_BQnd = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        return self.o_proj(out_BQnd.reshape(B, Q, self.n * self.d))


class DFlashLayer(nn.Module):
    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DFlashAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h_BQH, ctx_BSH, rope_q, rope_s, chunks: BlockChunks) -> torch.Tensor:
        h_BQH = h_BQH + self.self_attn(self.input_layernorm(h_BQH), ctx_BSH, rope_q, rope_s, chunks)
        return h_BQH + self.mlp(self.post_attention_layernorm(h_BQH))


class DFlashDraft(nn.Module):
    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__()
        self.cfg = cfg
        F_ = len(cfg.target_layer_ids) * cfg.hidden_size
        self.layers = nn.ModuleList([DFlashLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.fc = nn.Linear(F_, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        d = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        # The run's vocabulary mapping, kept so checkpoints carry it like every method's (export
        # and resume check it); DFlash itself predicts the full target vocabulary.
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=0.02)

    def rope(self, pos_BT: torch.Tensor, dtype: torch.dtype):
        ang_BTd = pos_BT[..., None].float() * self.inv_freq
        ang_BTd = torch.cat([ang_BTd, ang_BTd], dim=-1)
        return ang_BTd.cos().to(dtype), ang_BTd.sin().to(dtype)

    def project_context(self, feats_BSF: torch.Tensor) -> torch.Tensor:
        return self.hidden_norm(self.fc(feats_BSF.to(self.fc.weight.dtype)))

    def forward(self, feats_BSF: torch.Tensor, noise_BQH: torch.Tensor, pos_ctx_BS: torch.Tensor,
                pos_q_BQ: torch.Tensor, ctx_visible_BQS: torch.Tensor, K: int | None = None) -> torch.Tensor:
        """Hidden states [B, Q, H] of the Q = N*K block positions (before the target's lm_head);
        K defaults to the configured block size (the drafter passes shorter last blocks)."""
        return self.forward_projected(self.project_context(feats_BSF), noise_BQH, pos_ctx_BS, pos_q_BQ,
                                      ctx_visible_BQS, K)

    def forward_projected(self, ctx_BSH, noise_BQH, pos_ctx_BS, pos_q_BQ, ctx_visible_BQS,
                          K: int | None = None) -> torch.Tensor:
        K = K or self.cfg.block_size
        h_BQH = noise_BQH.to(ctx_BSH.dtype)
        rope_q, rope_s = self.rope(pos_q_BQ, h_BQH.dtype), self.rope(pos_ctx_BS, h_BQH.dtype)
        chunks = block_chunks(ctx_visible_BQS, K)
        for layer in self.layers:
            h_BQH = layer(h_BQH, ctx_BSH, rope_q, rope_s, chunks)
        return self.norm(h_BQH)
