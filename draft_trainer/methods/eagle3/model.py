"""The EAGLE-3 draft model (one Llama decoder layer) and its training-time-test (TTT) forward.

Legend (shapes):
  B batch, T sequence length, H target hidden size, h draft hidden size, V target vocab,
  Vd draft vocab, K number of TTT steps, nh query heads, nkv key/value heads, d head_dim.
  `emb_BTh`  embeddings of the input tokens         `g_BTh` the draft's hidden stream
  `aux_BT3H` the target's three aux hidden states   `q_BnTd`/`k_BkTd` per-head projections

Module and parameter names match SGLang's `LlamaForCausalLMEagle3` checkpoint keys
(`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`, `t2d`), so export is a rename-free copy.

TTT (reference, `ttt_forward`): step k (0..K-1) feeds the embeddings of the tokens shifted k
places further and the hidden output of step k-1 (step 0: fc(aux)); RoPE positions are t+k.
At step k >= 1 the query at t attends to step-0 keys 0..t (causal) and to the keys of steps
1..k at the same position t only (a diagonal), all inside one softmax. This file is the
readable reference; `ttt_fused.py` beside it is the fast path proven equal to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from draft_trainer.methods.eagle3.config import DraftConfig
from draft_trainer.methods.eagle3.ttt_fused import ttt_forward_fused
from draft_trainer.model.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rope, autocast_once
from draft_trainer.model.tensors import acc_dtype, shift_left


class Attention(nn.Module):
    """Llama attention whose q/k/v projections read 2h (input_layernorm(emb) | hidden_norm(g))."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.nh, self.nkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(2 * h, self.nh * d, bias=False)
        self.k_proj = nn.Linear(2 * h, self.nkv * d, bias=False)
        self.v_proj = nn.Linear(2 * h, self.nkv * d, bias=False)
        self.o_proj = nn.Linear(self.nh * d, h, bias=False)

    def qkv(self, x_BT2h: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor):
        B, T, _ = x_BT2h.shape
        xq, xk, xv = autocast_once(x_BT2h, 3)
        q_BnTd = self.q_proj(xq).view(B, T, self.nh, self.d).transpose(1, 2)
        k_BkTd = self.k_proj(xk).view(B, T, self.nkv, self.d).transpose(1, 2)
        v_BkTd = self.v_proj(xv).view(B, T, self.nkv, self.d).transpose(1, 2)
        return apply_rope(q_BnTd, cos_BTd, sin_BTd), apply_rope(k_BkTd, cos_BTd, sin_BTd), v_BkTd


class MidLayer(nn.Module):
    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def attn_input(self, emb_BTh: torch.Tensor, g_BTh: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.input_layernorm(emb_BTh), self.hidden_norm(g_BTh)], dim=-1)

    def finish(self, g_BTh: torch.Tensor, attn_BTnd: torch.Tensor) -> torch.Tensor:
        """Residual on the hidden stream g (not the embedding), then the MLP block."""
        g_BTh = g_BTh + self.self_attn.o_proj(attn_BTnd)
        return g_BTh + self.mlp(self.post_attention_layernorm(g_BTh))


class Eagle3Draft(nn.Module):
    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, H = cfg.hidden_size, cfg.target_hidden_size
        # Frozen copy of the target's input embedding (SGLang shares the target's; not exported).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)
        # EAGLE-3.1: one norm per aux layer before fc (SGLang/vLLM `fc_norm`, keys fc_norm.{0,1,2}).
        self.fc_norm = nn.ModuleList([RMSNorm(H, cfg.rms_norm_eps) for _ in range(3)]) if cfg.fc_norm else None
        self.fc = nn.Linear(3 * H, h, bias=False)
        self.midlayer = MidLayer(cfg)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_parameters, cfg.llama_config)

    # ------------------------------------------------------------------ pieces
    def rope(self, pos_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        dummy = torch.empty(0, dtype=dtype, device=pos_BT.device)
        cos, sin = self.rotary(dummy, pos_BT)
        return cos.to(dtype), sin.to(dtype)

    def logits(self, g_BTh: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(g_BTh))

    def project(self, aux_BT3H: torch.Tensor) -> torch.Tensor:
        """The first hidden stream g from the target's aux features: fc(aux), EAGLE-3.1 norming
        each aux layer first."""
        aux_BT3H = aux_BT3H.to(self.fc.weight.dtype)
        if self.fc_norm is not None:
            aux_BT3H = torch.cat([n(a) for n, a in zip(self.fc_norm, aux_BT3H.chunk(3, dim=-1))], dim=-1)
        return self.fc(aux_BT3H)

    def feed(self, g_BTh: torch.Tensor) -> torch.Tensor:
        """What the next draft step reads of a step's output g: g itself (EAGLE-3), or norm(g)
        with EAGLE-3.1's `norm_output` (the logits read norm(g) in both)."""
        return self.norm(g_BTh) if self.cfg.norm_output else g_BTh

    def set_vocab_mapping(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    def draft_to_target(self, ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocab ids -> target ids (SGLang: hot_token_id = d2t + arange(Vd))."""
        return ids + self.d2t[ids]

    # ------------------------------------------------------------------ training forward
    def forward(self, aux_BT3H: torch.Tensor, input_ids_BT: torch.Tensor, num_steps: int,
                attention_mask_BT: torch.Tensor | None = None) -> list[torch.Tensor]:
        """TTT over `num_steps` steps, fast path (ttt_fused.py): the hidden output of every step.

        `ttt_forward` below is the readable reference; they agree in forward and gradients
        (tests/unit/test_ttt_fused.py). Which one training runs is chosen in one place: step.py.
        """
        return ttt_forward_fused(self, aux_BT3H, input_ids_BT, num_steps, attention_mask_BT)

    # ------------------------------------------------------------------ TTT reference
    def ttt_forward(self, aux_BT3H: torch.Tensor, input_ids_BT: torch.Tensor, num_steps: int,
                    attention_mask_BT: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Reference TTT: returns the hidden output g_{k+1} [B,T,h] of every step k (before the
        final norm; step k+1 reads `feed(g_{k+1})`).

        `input_ids_BT[:, t]` is the token the draft reads at position t of step 0 (already
        shifted by one, see losses.py); step k reads `input_ids_BT[:, t + k]` (zero past the end).
        `attention_mask_BT` (1 = real token) excludes padded keys; with right padding the causal
        mask already does, so it only matters for left padding.
        """
        B, T, _ = aux_BT3H.shape
        attn = self.midlayer.self_attn
        g_BTh = self.project(aux_BT3H)
        dtype = g_BTh.dtype
        acc = acc_dtype(dtype)
        scale = attn.d ** -0.5
        rep = attn.nh // attn.nkv
        causal_TT = torch.ones(T, T, dtype=torch.bool, device=g_BTh.device).tril()
        if attention_mask_BT is not None:
            # A query always sees its own key: a padded query row is then never empty (no NaN
            # from an all -inf softmax with left padding); its loss weight is 0 anyway.
            eye_TT = torch.eye(T, dtype=torch.bool, device=g_BTh.device)
            key_ok_B1TT = causal_TT[None, None] & (attention_mask_BT.bool()[:, None, None, :] | eye_TT)
        else:
            key_ok_B1TT = causal_TT[None, None]
        base_pos = torch.arange(T, device=g_BTh.device)[None].expand(B, T)
        k0 = v0 = None
        diag_k, diag_v = [], []
        outs = []
        for k in range(num_steps):
            ids_BT = shift_left(input_ids_BT, k)
            emb_BTh = self.embed_tokens(ids_BT).to(dtype)
            cos, sin = self.rope(base_pos + k, dtype)
            q_BnTd, k_BkTd, v_BkTd = attn.qkv(self.midlayer.attn_input(emb_BTh, g_BTh), cos, sin)
            k_BnTd = k_BkTd.repeat_interleave(rep, dim=1)
            v_BnTd = v_BkTd.repeat_interleave(rep, dim=1)
            if k == 0:
                k0, v0 = k_BnTd, v_BnTd
            else:
                diag_k.append(k_BnTd)
                diag_v.append(v_BnTd)
            # Scores against step-0 keys (causal) and the diagonal keys of steps 1..k.
            s0_BnTT = (q_BnTd @ k0.transpose(-1, -2)).to(acc) * scale
            s0_BnTT = s0_BnTT.masked_fill(~key_ok_B1TT, float("-inf"))
            sd = [((q_BnTd * kd).sum(-1, keepdim=True)).to(acc) * scale for kd in diag_k]
            p = torch.softmax(torch.cat([s0_BnTT, *sd], dim=-1), dim=-1)
            o_BnTd = p[..., :T].to(dtype) @ v0
            for j, vd in enumerate(diag_v):
                o_BnTd = o_BnTd + p[..., T + j : T + j + 1].to(dtype) * vd
            o_BTnd = o_BnTd.transpose(1, 2).reshape(B, T, -1)
            out_BTh = self.midlayer.finish(g_BTh, o_BTnd)
            outs.append(out_BTh)
            g_BTh = self.feed(out_BTh)
        return outs

    # ------------------------------------------------------------------ incremental (serving/eval)
    def step(self, emb_BTh: torch.Tensor, g_BTh: torch.Tensor, pos_BT: torch.Tensor,
             cache: "KVCache") -> torch.Tensor:
        """Plain causal decoding with a KV cache (what SGLang runs when drafting): returns g'.
        `g_BTh` is fc(aux) or `feed` of the previous step's g'."""
        attn = self.midlayer.self_attn
        cos, sin = self.rope(pos_BT, g_BTh.dtype)
        q_BnTd, k_BkTd, v_BkTd = attn.qkv(self.midlayer.attn_input(emb_BTh, g_BTh), cos, sin)
        k_all, v_all = cache.append(k_BkTd, v_BkTd)
        T, S = q_BnTd.shape[2], k_all.shape[2]
        # Queries are the last T positions of the cache: causal within them, full over the past.
        mask_TS = torch.ones(T, S, dtype=torch.bool, device=q_BnTd.device).tril(diagonal=S - T)
        o_BnTd = F.scaled_dot_product_attention(q_BnTd, k_all, v_all, attn_mask=mask_TS,
                                                enable_gqa=attn.nh != attn.nkv)
        o_BTnd = o_BnTd.transpose(1, 2).reshape(q_BnTd.shape[0], T, -1)
        return self.midlayer.finish(g_BTh, o_BTnd)


@dataclass
class KVCache:
    k_BkSd: torch.Tensor | None = None
    v_BkSd: torch.Tensor | None = None

    def append(self, k_BkTd: torch.Tensor, v_BkTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_BkSd is None:
            self.k_BkSd, self.v_BkSd = k_BkTd, v_BkTd
        else:
            self.k_BkSd = torch.cat([self.k_BkSd, k_BkTd], dim=2)
            self.v_BkSd = torch.cat([self.v_BkSd, v_BkTd], dim=2)
        return self.k_BkSd, self.v_BkSd

    def truncate(self, length: int) -> None:
        if self.k_BkSd is not None:
            self.k_BkSd = self.k_BkSd[:, :, :length]
            self.v_BkSd = self.v_BkSd[:, :, :length]

    @property
    def length(self) -> int:
        return 0 if self.k_BkSd is None else self.k_BkSd.shape[2]
