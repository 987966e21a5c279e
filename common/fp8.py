"""FP8 (e4m3) feature encoding with one scale per token and group: halves the wire bytes of bf16.

Legend (shapes): N tokens, W row width, G groups per row (W = G * group; a group is one
captured layer's hidden state, so each layer of each token gets its own scale).

Encoding: scale_NG = amax(|x| over the group) / 448 (e4m3's largest finite value), q = x / scale
rounded to e4m3. Error bound per element (tests/unit/test_fp8_features.py):
|x' - x| <= 2^-4 |x| (3 mantissa bits, round to nearest) + 2^-10 scale (e4m3's subnormal step is
2^-9 of the scale unit), plus the rounding of the dtype it is decoded into.
"""

from __future__ import annotations

import torch

FP8_E4M3 = "float8_e4m3"
TENSOR_WIRE_DTYPES = (FP8_E4M3,)       # what a feature spec may ask per tensor (else: the server's dtype)
E4M3_MAX = 448.0


def quantize_e4m3(x_NW: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, W] (any float dtype) -> (q_NW as uint8 bytes of e4m3, scale_NG float32)."""
    N, W = x_NW.shape
    if W % group:
        raise ValueError(f"row width {W} is not a multiple of the scale group {group}")
    x_NGg = x_NW.detach().to(device="cpu", dtype=torch.float32).reshape(N, W // group, group)
    scale_NG = (x_NGg.abs().amax(-1) / E4M3_MAX).clamp_min_(torch.finfo(torch.float32).tiny)
    q_NGg = (x_NGg / scale_NG[..., None]).to(torch.float8_e4m3fn)
    return q_NGg.view(torch.uint8).reshape(N, W), scale_NG


def dequantize_e4m3(q_NW: torch.Tensor, scale_NG: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(e4m3 bytes [N, W], scale_NG) -> [N, W] in `dtype`: one new tensor, written in place (the
    input may be a read-only view of an Arrow buffer; nothing else is allocated)."""
    N, W = q_NW.shape
    G = scale_NG.shape[1]
    out_NW = torch.empty(N, W, dtype=dtype)
    if N:
        out_NGg = out_NW.view(N, G, W // G)
        out_NGg.copy_(q_NW.view(torch.float8_e4m3fn).view(N, G, W // G))
        out_NGg.mul_(scale_NG[..., None])
    return out_NW
