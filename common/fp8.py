"""FP8 (e4m3) feature encoding with one scale per token and group: half of bf16's wire bytes.

Legend (shapes): N tokens, W row width, G groups per row, g = W / G (a group is one captured
layer's hidden state, so each layer of each token gets its own scale).

Encoding: scale_NG = 2^k, the smallest power of two with amax(|x| over the group) / scale <= 448
(e4m3's largest finite value), q = x / scale rounded to nearest e4m3. A power of two makes the
scaling exact in any float format, so on CPU both directions are integer arithmetic on the bit
patterns plus a table lookup (torch's scalar fp8 casts on CPU run ~50 M elements/s, too slow
for the data plane); on CUDA the torch casts run where the features are.
Error bound per element (tests/unit/test_fp8_features.py): |x' - x| <= 2^-4 |x| (3 mantissa bits,
round to nearest) + 2^-10 scale (e4m3's subnormal step is 2^-9), plus the rounding of the dtype
decoded into. Features must be finite (NaN/inf are not features).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

FP8_E4M3 = "float8_e4m3"
TENSOR_WIRE_DTYPES = (FP8_E4M3,)       # what a feature spec may ask per tensor (else: the server's dtype)
E4M3_MAX = 448.0
_K_RANGE = (-126, 120)                  # scale exponents kept inside bf16/fp32's normal range
# bit layouts (int view, mantissa bits, sign mask) of the formats with a fast path
_BITS = {torch.bfloat16: (torch.int16, np.int16, 7, -0x8000), torch.float32: (torch.int32, np.int32, 23, -0x80000000)}


@functools.lru_cache(maxsize=None)
def _encode_lut() -> np.ndarray:
    """bf16 bit pattern (as uint16) -> e4m3 byte, round to nearest even (torch's cast, once)."""
    bf = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return bf.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8).numpy().copy()


@functools.lru_cache(maxsize=None)
def _decode_lut(dtype: torch.dtype) -> np.ndarray:
    """e4m3 byte -> bit pattern of its value in `dtype` (exact: e4m3 fits bf16 and fp32)."""
    tdt, ndt, _, _ = _BITS[dtype]
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(dtype)
    return vals.view(tdt).numpy().astype(ndt)


def _scale_exponents(amax_NG: torch.Tensor) -> torch.Tensor:
    k = torch.ceil(torch.log2(amax_NG.float() / E4M3_MAX))
    return torch.where(amax_NG > 0, k, torch.zeros_like(k)).clamp_(*_K_RANGE).to(torch.int32)


def quantize_e4m3(x_NW: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, W] -> (q_NW: e4m3 bytes as uint8 on CPU, scale_NG: float32 powers of two on CPU)."""
    N, W = x_NW.shape
    if W % group:
        raise ValueError(f"row width {W} is not a multiple of the scale group {group}")
    x = x_NW.detach()
    G = W // group
    if x.device.type != "cpu" or x.dtype != torch.bfloat16:
        x_NGg = x.reshape(N, G, group)
        k_NG = _scale_exponents(x_NGg.abs().amax(-1))
        q = (x_NGg.float() * torch.exp2(-k_NG.float())[..., None]).to(torch.float8_e4m3fn)
        return q.view(torch.uint8).reshape(N, W).cpu(), torch.exp2(k_NG.float()).cpu()
    b_NGg = x.contiguous().view(torch.int16).numpy().reshape(N, G, group)
    mag = b_NGg & np.int16(0x7FFF)                              # |x| bits; ordered like |x| itself
    k_NG = _scale_exponents(torch.from_numpy((mag.max(-1).astype(np.int32) << 16).view(np.float32)))
    mag -= (k_NG.numpy().astype(np.int16) << 7)[..., None]      # |x| / 2^k: exponent field minus k
    np.maximum(mag, 0, out=mag)                                 # below bf16's normal range -> 0 (e4m3 has it as 0)
    mag |= b_NGg & np.int16(-0x8000)                            # the sign back
    q = _encode_lut()[mag.view(np.uint16)]
    return torch.from_numpy(q.reshape(N, W)), torch.exp2(k_NG.float())


def dequantize_e4m3(q_NW: torch.Tensor, scale_NG: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(e4m3 bytes [N, W], scale_NG) -> a new [N, W] tensor in `dtype` (the only allocation; the
    bytes may be a read-only view of an Arrow buffer)."""
    N, W = q_NW.shape
    G = scale_NG.shape[1]
    k_NG = torch.log2(scale_NG) if N else scale_NG
    if dtype not in _BITS or N == 0 or not bool((k_NG == k_NG.round()).all()):
        out = torch.empty(N, W, dtype=dtype)
        out.view(N, G, W // G).copy_(q_NW.view(torch.float8_e4m3fn).view(N, G, W // G)).mul_(scale_NG[..., None])
        return out
    tdt, ndt, mant, _ = _BITS[dtype]
    codes = q_NW.numpy().reshape(N, G, W // G)
    bits = _decode_lut(dtype)[codes]                            # the new tensor: e4m3 value, unscaled
    shift = (k_NG.to(torch.int64).numpy() << mant).astype(ndt)[..., None]
    np.add(bits, shift, out=bits, where=(codes & 0x7F) != 0)    # times 2^k: exponent field plus k (zeros stay 0)
    return torch.from_numpy(bits.reshape(N, W)).view(dtype)
