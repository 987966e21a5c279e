"""Which dtype this machine computes fast: the one place that turns a dtype of `auto` into bf16 or fp32.

Why it matters on CPUs: without native bf16 dot products (AVX512-BF16 or AMX) torch computes a bf16
matmul through conversions. On a 2-core AVX2 EPYC, SmolLM2-135M ran a 4x512 prefill 5.8x and batched
greedy generation 4.9x slower in bf16 than in fp32 (docs/notes/issue-20.md, session 17), while on an AMX
Xeon bf16 was the faster one. Target servers, answer regeneration, the trainer's draft and the evaluation
all pick through `pick_dtype`, so `auto` means the same dtype everywhere in one run on one machine.
"""

from __future__ import annotations

import functools

import torch

from common.errors import ConfigError

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")


@functools.lru_cache(maxsize=None)
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True on CPUs with native bf16 dot products (AVX512-BF16 or AMX); False where the flags are unreadable."""
    try:
        with open(cpuinfo) as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(dtype: str, device: str | torch.device = "cpu", *, setting: str = "dtype") -> str:
    """`auto` -> "bf16" on a CUDA device with bf16 or a CPU with native bf16, else "fp32"; a named dtype
    is returned as given, after a check that it is one (the error names `setting`, e.g. "--dtype")."""
    if dtype not in DTYPE_CHOICES:
        raise ConfigError(f"{setting} {dtype!r}: use one of {', '.join(DTYPE_CHOICES)} "
                          "(auto: bf16 where the device computes it natively, else fp32)")
    if dtype != "auto":
        return dtype
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if dev.type == "cpu" and cpu_has_bf16() else "fp32"
