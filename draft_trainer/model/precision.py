"""Which dtype the draft computes in: bf16 where the hardware has it, fp32 master weights always."""

from __future__ import annotations

import contextlib

import torch

from common.errors import ConfigError
from common.hardware import pick_dtype

PRECISIONS = ("auto", "bf16", "fp32")


def compute_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """`auto` -> bf16 where supported (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: use one of {PRECISIONS}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if pick_dtype("auto", device) == "bf16" else torch.float32


def autocast(device: torch.device | str, dtype: torch.dtype):
    """Autocast to `dtype` for bf16/fp16 compute; a no-op context for fp32/fp64 (exact paths)."""
    dev = torch.device(device)
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(dev.type, dtype=dtype)
    return contextlib.nullcontext()


def cast_frozen(model: torch.nn.Module, target_head_VH: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Keep the frozen tensors (draft embedding, target lm_head) in the compute dtype.

    They are only ever read in that dtype (bf16 matmuls / embeddings fed to autocast), so fp32
    copies would just double their memory and cost a cast per step. Trainable weights stay fp32.
    """
    if dtype in (torch.bfloat16, torch.float16):
        model.embed_tokens.weight.data = model.embed_tokens.weight.data.to(dtype)
        if target_head_VH is not None:
            target_head_VH = target_head_VH.to(dtype)
    return target_head_VH
