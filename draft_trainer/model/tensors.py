"""Tensor helpers shared by every draft method (no model code here).

Legend (shapes): B batch, T sequence length.
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
