"""Tensor helpers shared by every draft method (no model code here).

Legend (shapes): B batch, T sequence length, c rows, V a vocabulary.
"""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: at least fp32 (bf16/fp16 -> fp32; fp64 stays fp64 for exactness tests)."""
    return torch.promote_types(dtype, torch.float32)


def shift_left(x_BT: torch.Tensor, n: int, fill: float | int = 0) -> torch.Tensor:
    """x[:, t + n] at position t, `fill` past the end (n = 0 returns x itself)."""
    if n == 0:
        return x_BT
    out = torch.full_like(x_BT, fill)
    if n < x_BT.shape[1]:
        out[:, : x_BT.shape[1] - n] = x_BT[:, n:]
    return out


def rowsum(x_cV: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Row sums in >= fp32, fast for bf16 on CPU.

    `x.sum(-1, dtype=float32)` on a bf16 tensor first copies the whole tensor to fp32 (~20x slower
    than a bf16 sum). Summing blocks of 128 in bf16 (fp32 accumulation inside, one rounding per
    block) and the block sums in fp32 keeps the relative error near 1e-4 at bf16-sum speed.
    """
    red = acc_dtype(x_cV.dtype)
    if x_cV.dtype == red:
        return x_cV.sum(-1)
    V = x_cV.shape[-1]
    main = V // block * block
    out = x_cV[:, :main].unflatten(-1, (-1, block)).sum(-1).to(red).sum(-1)
    if main < V:
        out += x_cV[:, main:].to(red).sum(-1)
    return out
