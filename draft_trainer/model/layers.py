"""Llama building blocks shared by draft methods: RMSNorm and rotary embeddings.

Legend (shapes): B batch, T sequence length, n heads, d head_dim, f = d / 2 rotary frequencies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from draft_trainer.model.tensors import acc_dtype


class _RMSNormFn(torch.autograd.Function):
    """weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype), keeping only x and the [.., 1] rsqrt for
    backward (autograd's graph keeps x32 and the normed copy too: in bf16, 3x x's bytes per call). The
    backward is autograd's, op for op: the same roundings (the normed grad through x's dtype)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(acc_dtype(x.dtype))
        r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (x32 * r).to(x.dtype)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        x32 = x.to(acc_dtype(x.dtype))
        n = (x32 * r).to(x.dtype)
        dw = (dout * n).sum_to_size(weight.shape) if ctx.needs_input_grad[1] else None
        if not ctx.needs_input_grad[0]:
            return None, dw, None
        dy32 = (dout * weight).to(x.dtype).to(x32.dtype)
        dr = (dy32 * x32).sum(-1, keepdim=True)
        ds = -0.5 * dr * r.pow(3)
        dx32 = dy32 * r + (ds.expand(x32.shape) / x32.shape[-1]) * (2 * x32)
        return dx32.to(x.dtype), dw, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps)


class _CastOnce(torch.autograd.Function):
    """x cast to `dtype` once for n consumers (n outputs viewing one tensor); their gradients are cast
    back and summed in x's dtype, as n separate autocast casts would, but one copy is kept, not n."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype, n: int):
        ctx.src = x.dtype
        xc = x.to(dtype)
        return tuple(xc.view_as(xc) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        total = None
        for g in grads:
            if g is not None:
                total = g.to(ctx.src) if total is None else total + g.to(ctx.src)
        return total, None, None


def autocast_once(x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """x for n linears under autocast: cast to the autocast dtype once (autocast would cast it per linear,
    and each linear would keep its own copy for backward: 2 extra [T,2h] copies per q/k/v). Outside
    autocast, or when x already has that dtype, x itself n times."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev) or not x.is_floating_point() or x.dtype == torch.get_autocast_dtype(dev):
        return (x,) * n
    return _CastOnce.apply(x, torch.get_autocast_dtype(dev), n)


def _rope_cos_sin(rot: "RotaryEmbedding", x: torch.Tensor, position_ids_BT: torch.Tensor):
    freqs_BTf = position_ids_BT[..., None].float() * rot.inv_freq.to(device=x.device, dtype=torch.float)
    emb_BTd = torch.cat((freqs_BTf, freqs_BTf), dim=-1)
    return (emb_BTd.cos() * rot.attention_scaling).to(x.dtype), (emb_BTd.sin() * rot.attention_scaling).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Llama's rotary embedding: (cos, sin) of position x inv_freq, as transformers' LlamaRotaryEmbedding.

    The default RoPE is computed here. Other types (llama3, linear, yarn, dynamic, longrope...) take
    their frequencies and dynamic updates from transformers' `modeling_rope_utils`, on the HF config
    `hf_config()` returns, built only then: importing transformers' Llama modeling code and config for
    a default RoPE cost the trainer process ~190 MB of resident memory (generation, masking, hub code).
    """

    def __init__(self, head_dim: int, rope_parameters: dict, hf_config=None) -> None:
        super().__init__()
        self.rope_type = rope_parameters.get("rope_type", "default")
        self._forward = _rope_cos_sin
        if self.rope_type == "default":
            inv_freq = 1.0 / (rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            self.attention_scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

            if hf_config is None:
                raise ValueError(f"rope_type {self.rope_type!r} needs hf_config (a callable returning the HF config)")
            self.config = hf_config()     # attributes below are what transformers' dynamic updates read
            self.max_seq_len_cached = self.original_max_seq_len = self.config.max_position_embeddings
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self.config)
            self._forward = dynamic_rope_update(_rope_cos_sin)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, d] in x's dtype (x only gives dtype and device)."""
        return self._forward(self, x, position_ids_BT)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x_BnTd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    return x_BnTd * cos_BTd[:, None] + rotate_half(x_BnTd) * sin_BTd[:, None]


class _SiluMulLinear(torch.autograd.Function):
    """down(silu(a) * b) keeping only a and b for backward (silu(a), the product and down's input are
    recomputed there): 2 of the MLP's 5 [T, ffn] tensors per call instead of 5. The same ops in the same
    dtypes as autocast's autograd graph: down's fp32 weight W is cast to a's dtype for the matmuls (and
    again in backward, instead of keeping the copy), its gradient computed in that dtype, then cast."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b, W)
        return F.linear(F.silu(a) * b, W.to(a.dtype))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        a, b, W = ctx.saved_tensors
        s = F.silu(a)
        dW = dy.reshape(-1, dy.shape[-1]).T.mm((s * b).reshape(-1, b.shape[-1]))
        dh = dy.matmul(W.to(a.dtype))
        return torch.ops.aten.silu_backward(dh * b, a), dh * s, dW.to(W.dtype)


class SwiGLU(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)). Parameter names are the HF/SGLang checkpoint keys."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xg, xu = autocast_once(x, 2)
        a, b = self.gate_proj(xg), self.up_proj(xu)
        dev = x.device.type
        if torch.is_autocast_enabled(dev) and a.dtype == torch.get_autocast_dtype(dev):
            return _SiluMulLinear.apply(a, b, self.down_proj.weight)
        return self.down_proj(F.silu(a) * b)
