"""Llama building blocks shared by draft methods: RMSNorm and rotary embeddings.

Legend (shapes): B batch, T sequence length, n heads, d head_dim.
"""

from __future__ import annotations

import torch
from torch import nn

from draft_trainer.model.tensors import acc_dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(acc_dtype(dtype))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x_BnTd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    return x_BnTd * cos_BTd[:, None] + rotate_half(x_BnTd) * sin_BTd[:, None]
