"""The DFlash draft: a few non-causal decoder layers that fill a whole block of tokens in one forward.

Legend (shapes): B batch, S context positions (target features), N blocks per sample, K block
size, H hidden (draft = target width), F = L*H concatenated target-layer features, n query heads,
g key/value heads, d head dim, M supervised block positions, V target vocabulary.

Each block is [anchor token, mask x (K-1)] at positions anchor..anchor+K-1 (embedded with the
target's frozen embedding). Every draft layer's attention keys/values are the projected target
context (`hidden_norm(fc(features))`, the same for every layer, not re-normed) followed by the
block's own positions; a block sees context strictly before its anchor and all of its own block
(bidirectional), never another block. The output hidden states go through the target's lm_head.
The module names/keys are those SGLang's `DFlashDraftModel.load_weights` and the reference HF
class read (export.py writes them unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from draft_trainer.methods.dflash.config import DFlashConfig
from draft_trainer.model.layers import RMSNorm, SwiGLU, apply_rope


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

    def forward(self, x_BQH: torch.Tensor, ctx_BSH: torch.Tensor, rope_q, rope_s, ctx_visible_BQS: torch.Tensor,
                K: int) -> torch.Tensor:
        """Queries: the Q = N*K block positions; keys: the S context positions + the query's own block."""
        B, Q, _ = x_BQH.shape
        N = Q // K
        q_BnQd = apply_rope(self.q_norm(self._heads(self.q_proj(x_BQH), self.n)), *rope_q)
        kc_BgSd = apply_rope(self.k_norm(self._heads(self.k_proj(ctx_BSH), self.g)), *rope_s)
        vc_BgSd = self._heads(self.v_proj(ctx_BSH), self.g)
        kb_BgQd = apply_rope(self.k_norm(self._heads(self.k_proj(x_BQH), self.g)), *rope_q)
        vb_BgQd = self._heads(self.v_proj(x_BQH), self.g)
        rep = self.n // self.g
        kc_BnSd, vc_BnSd = kc_BgSd.repeat_interleave(rep, 1), vc_BgSd.repeat_interleave(rep, 1)
        kb_BnNKd = kb_BgQd.repeat_interleave(rep, 1).view(B, self.n, N, K, self.d)
        vb_BnNKd = vb_BgQd.repeat_interleave(rep, 1).view(B, self.n, N, K, self.d)
        scale = self.d ** -0.5
        # One softmax over [context | own block]: the context part is masked per block, the block
        # part is computed block by block, so no [Q, S + Q] mask is ever built.
        sc_BnQS = (q_BnQd @ kc_BnSd.transpose(-1, -2)) * scale
        sc_BnQS = sc_BnQS.masked_fill(~ctx_visible_BQS[:, None], float("-inf"))
        sb_BnNKK = (q_BnQd.view(B, self.n, N, K, self.d) @ kb_BnNKd.transpose(-1, -2)) * scale
        s_BnQX = torch.cat([sc_BnQS, sb_BnNKK.reshape(B, self.n, Q, K)], dim=-1)
        p_BnQX = torch.softmax(s_BnQX.float(), dim=-1).to(q_BnQd.dtype)
        S = kc_BnSd.shape[2]
        out_BnQd = p_BnQX[..., :S] @ vc_BnSd
        out_BnQd = out_BnQd + (p_BnQX[..., S:].reshape(B, self.n, N, K, K) @ vb_BnNKd).reshape(B, self.n, Q, self.d)
        return self.o_proj(out_BnQd.transpose(1, 2).reshape(B, Q, self.n * self.d))


class DFlashLayer(nn.Module):
    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DFlashAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h_BQH, ctx_BSH, rope_q, rope_s, ctx_visible_BQS, K: int) -> torch.Tensor:
        h_BQH = h_BQH + self.self_attn(self.input_layernorm(h_BQH), ctx_BSH, rope_q, rope_s, ctx_visible_BQS, K)
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
        for layer in self.layers:
            h_BQH = layer(h_BQH, ctx_BSH, rope_q, rope_s, ctx_visible_BQS, K)
        return self.norm(h_BQH)
