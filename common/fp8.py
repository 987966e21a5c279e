"""FP8 (e4m3) feature encoding with one scale per token and group: half of bf16's wire bytes.

Legend (shapes): N tokens, W row width, G groups per row, g = W / G (a group is one captured
layer's hidden state, so each layer of each token gets its own scale).

Encoding: scale_NG = 2^k, the smallest power of two with amax(|x| over the group) / scale <= 448
(e4m3's largest finite value), q = x / scale rounded to nearest e4m3. A power of two makes the
scaling exact in any float format, so on CPU encoding is integer arithmetic on the bf16 bit
patterns plus a table lookup, and decoding a lookup of two bytes at a time times the scale
(torch's scalar fp8 casts on CPU are too slow for the data plane); on CUDA the torch casts run
where the features are. Groups too small for the bit paths to be exact (scale < 2^-117) take
torch's casts on CPU too.
Error bound per element (tests/unit/test_fp8_features.py): |x' - x| <= 2^-4 |x| (3 mantissa bits,
round to nearest) + 2^-10 scale (e4m3's subnormal step is 2^-9), plus the rounding of the dtype
decoded into. Features must be finite (NaN/inf are not features).

`Fp8Rows` is what a client keeps of an fp8 column: the e4m3 bytes and their scales as they
arrived (views of the Arrow buffers), upcast once, where a copy happens anyway: into the padded
training batch on CPU, or on the accelerator after the (half-size) host-to-device copy.
Upcasting equals decoding into the served dtype and then casting, bit for bit (tested).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import numpy as np
import torch

FP8_E4M3 = "float8_e4m3"
TENSOR_WIRE_DTYPES = (FP8_E4M3,)       # what a feature spec may ask per tensor (else: the server's dtype)
E4M3_MAX = 448.0
_K_RANGE = (-126, 120)                  # scale exponents kept inside bf16/fp32's normal range
# Scale exponents from which every decoded value (>= 2^-9 * 2^k) is normal in bf16 and fp32: the
# CPU fast paths are exact there, and decoding into bf16 then casting to fp32 changes nothing.
_K_EXACT_MIN = -117
_BLOCK_ELEMS = 1 << 17                  # CPU encode/upcast row blocks: each block stays in L2 across its passes
_FAST_DTYPES = (torch.bfloat16, torch.float32)  # served / out dtypes of the CPU fast upcast


@functools.lru_cache(maxsize=None)
def _encode_lut() -> np.ndarray:
    """bf16 bit pattern (as uint16) -> e4m3 byte, round to nearest even (torch's cast, once)."""
    bf = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return bf.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8).numpy().copy()


def _scale_exponents(amax_NG: torch.Tensor) -> torch.Tensor:
    k = torch.ceil(torch.log2(amax_NG.float() / E4M3_MAX))
    return torch.where(amax_NG > 0, k, torch.zeros_like(k)).clamp_(*_K_RANGE).to(torch.int32)


def _quantize_torch(x_NW: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    N, W = x_NW.shape
    x_NGg = x_NW.reshape(N, W // group, group)
    k_NG = _scale_exponents(x_NGg.abs().amax(-1))
    q = (x_NGg.float() * torch.exp2(-k_NG.float())[..., None]).to(torch.float8_e4m3fn)
    return q.view(torch.uint8).reshape(N, W).cpu(), torch.exp2(k_NG.float()).cpu()


def quantize_e4m3(x_NW: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, W] -> (q_NW: e4m3 bytes as uint8 on CPU, scale_NG: float32 powers of two on CPU)."""
    N, W = x_NW.shape
    if W % group:
        raise ValueError(f"row width {W} is not a multiple of the scale group {group}")
    x = x_NW.detach()
    G = W // group
    if x.device.type != "cpu" or x.dtype != torch.bfloat16:
        return _quantize_torch(x, group)
    b_NGg = x.contiguous().view(torch.int16).numpy().reshape(N, G, group)
    mag = b_NGg & np.int16(0x7FFF)                              # |x| bits; ordered like |x| itself
    top = mag.max(-1)                                           # amax bits [N, G]
    # k = ceil(log2(amax / 448)) from the bits (exact, = _scale_exponents): amax = 2^(E-127) * 1.M and
    # 448 = 2^8 * 1.75, so k = E - 135, plus 1 where the mantissa exceeds 1.75 (M > 96)
    k_NG = (top >> 7).astype(np.int16) - np.int16(135) + ((top & np.int16(0x7F)) > 96)
    k_NG = np.where(top == 0, np.int16(0), k_NG).clip(*_K_RANGE).astype(np.int16)
    if N and int(k_NG.min()) < _K_EXACT_MIN:
        return _quantize_torch(x, group)                        # amax < ~2^-108: bf16 subnormals would matter
    shift = (k_NG << 7)[..., None]
    q_NGg = np.empty((N, G, group), np.uint8)
    lut, zero = _encode_lut(), np.int16(0)
    rows = max(1, _BLOCK_ELEMS // W)                            # row blocks: the passes below stay in L2
    for a in range(0, N, rows):
        m = mag[a : a + rows]
        m -= shift[a : a + rows]                                # |x| / 2^k: exponent field minus k
        np.maximum(m, zero, out=m)                              # below bf16's normal range -> 0 (e4m3 has it as 0)
        m |= b_NGg[a : a + rows] & np.int16(-0x8000)            # the sign back
        np.take(lut, m.view(np.uint16), out=q_NGg[a : a + rows], mode="clip")  # clip: `out` is not copied
    return torch.from_numpy(q_NGg.reshape(N, W)), torch.exp2(torch.from_numpy(k_NG).float())


@functools.lru_cache(maxsize=None)
def _pair_lut() -> np.ndarray:
    """Two e4m3 bytes read as one little-endian uint16 -> their two fp32 values as one int64
    (512 KiB, L2-resident): one gather per two elements, ~5x a byte-wise lookup."""
    one = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    i = np.arange(65536)
    return np.ascontiguousarray(np.stack([one[i & 0xFF], one[i >> 8]], -1)).view(np.int64).reshape(-1)


def _fast_ok(q_NW: torch.Tensor, scale_NG: torch.Tensor, served: torch.dtype, out_NW: torch.Tensor) -> bool:
    """Whether the CPU fast path gives exactly the generic result: powers of two with decoded values
    normal in bf16/fp32 (so the served dtype's rounding is exact), row pairs, plain layouts."""
    N, W = q_NW.shape
    if (N == 0 or W % 2 or sys.byteorder != "little" or q_NW.device.type != "cpu" or out_NW.device.type != "cpu"
            or served not in _FAST_DTYPES or out_NW.dtype not in _FAST_DTYPES or not out_NW.is_contiguous()
            or not q_NW.is_contiguous()):
        return False
    k_NG = torch.log2(scale_NG.float())
    return bool((k_NG == k_NG.round()).all()) and float(k_NG.min()) >= _K_EXACT_MIN


def upcast_torch(q_NW: torch.Tensor, scale_NG: torch.Tensor, served: torch.dtype, out_NW: torch.Tensor) -> torch.Tensor:
    """The generic upcast, on any device (torch's e4m3 casts): decode into the served dtype (one
    rounding of e4m3 value x scale), then into out's dtype. On CUDA this is the whole upcast."""
    N, W = q_NW.shape
    G = scale_NG.shape[1]
    q_NGg = q_NW.view(torch.float8_e4m3fn).view(N, G, W // G)
    s_NG1 = scale_NG.to(q_NW.device)[..., None]
    if out_NW.dtype == served and out_NW.is_contiguous():
        out_NW.view(N, G, W // G).copy_(q_NGg).mul_(s_NG1)   # served dtype: rounds once (bf16 mul computes in fp32)
    else:
        out_NW.copy_(q_NGg.to(served).mul_(s_NG1).view(N, W))
    return out_NW


def _upcast_cpu_fast(q_NW: torch.Tensor, scale_NG: torch.Tensor, out_NW: torch.Tensor) -> None:
    """Row blocks: gather fp32 values two bytes at a time, times the scale in place (exact: powers
    of two, normal results), into out (fp32: in place; bf16: through an L2-sized fp32 block)."""
    N, W = q_NW.shape
    G = scale_NG.shape[1]
    lut = _pair_lut()
    codes = q_NW.numpy().view(np.uint16)                        # [N, W/2]: byte pairs
    s_NG1 = scale_NG.float().numpy()[..., None]
    rows = max(1, _BLOCK_ELEMS // W)
    direct = out_NW.dtype == torch.float32
    tmp = None if direct else np.empty((rows, W), np.float32)
    for a in range(0, N, rows):
        b = min(a + rows, N)
        blk = out_NW[a:b].numpy() if direct else tmp[: b - a]
        np.take(lut, codes[a:b], out=blk.view(np.int64), mode="clip")   # clip: `out` is not buffered
        blk3 = blk.reshape(b - a, G, W // G)
        np.multiply(blk3, s_NG1[a:b], out=blk3)
        if not direct:
            out_NW[a:b].copy_(torch.from_numpy(blk))              # fp32 -> bf16: exact (3 mantissa bits)


def upcast_e4m3(q_NW: torch.Tensor, scale_NG: torch.Tensor, served: torch.dtype,
                out_NW: torch.Tensor | None = None) -> torch.Tensor:
    """(e4m3 bytes [N, W], scale_NG) -> values decoded into `served`, written into `out_NW` (any float
    dtype, e.g. a slice of a padded fp32 batch; new [N, W] tensor in `served` if None) = decoding
    into `served` then casting to out's dtype, bit for bit. The bytes may be a read-only view."""
    N, W = q_NW.shape
    if out_NW is None:
        out_NW = torch.empty(N, W, dtype=served, device=q_NW.device)
    elif tuple(out_NW.shape) != (N, W):
        raise ValueError(f"upcast: out is {tuple(out_NW.shape)}, the rows are {(N, W)}")
    if _fast_ok(q_NW, scale_NG, served, out_NW):
        _upcast_cpu_fast(q_NW, scale_NG, out_NW)
        return out_NW
    return upcast_torch(q_NW, scale_NG, served, out_NW)


def dequantize_e4m3(q_NW: torch.Tensor, scale_NG: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(e4m3 bytes [N, W], scale_NG) -> a new [N, W] tensor in `dtype` (the only allocation; the
    bytes may be a read-only view of an Arrow buffer)."""
    return upcast_e4m3(q_NW, scale_NG, dtype)


@dataclass(frozen=True)
class Fp8Rows:
    """Rows of one fp8 tensor as they arrived: e4m3 bytes [N, W] and float32 scales [N, G] (views
    of the Arrow buffers on a client: nothing copied), standing for values in `dtype` (the served
    dtype). Sliced by rows like a tensor; `upcast(out)` is the one place they become floats."""

    q_NW: torch.Tensor
    scale_NG: torch.Tensor
    dtype: torch.dtype

    ndim = 2

    def __post_init__(self) -> None:
        if self.q_NW.dtype != torch.uint8 or self.q_NW.ndim != 2 or self.scale_NG.ndim != 2 or \
                self.scale_NG.shape[0] != self.q_NW.shape[0] or self.q_NW.shape[1] % max(self.scale_NG.shape[1], 1):
            raise ValueError(f"Fp8Rows: bytes {self.q_NW.dtype} {tuple(self.q_NW.shape)} and scales "
                             f"{tuple(self.scale_NG.shape)} do not fit (uint8 [N, W], [N, G] with G dividing W)")

    @property
    def shape(self) -> torch.Size:
        return self.q_NW.shape

    @property
    def device(self) -> torch.device:
        return self.q_NW.device

    @property
    def nbytes(self) -> int:
        return self.q_NW.nbytes + self.scale_NG.nbytes

    def __len__(self) -> int:
        return self.q_NW.shape[0]

    def __getitem__(self, rows: slice) -> "Fp8Rows":
        if not isinstance(rows, slice):
            raise TypeError("Fp8Rows are indexed by row slices only; upcast() them for anything else")
        return Fp8Rows(self.q_NW[rows], self.scale_NG[rows], self.dtype)

    def upcast(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return upcast_e4m3(self.q_NW, self.scale_NG, self.dtype, out)

    def to(self, device, non_blocking: bool = False) -> "Fp8Rows":
        return Fp8Rows(self.q_NW.to(device, non_blocking=non_blocking),
                       self.scale_NG.to(device, non_blocking=non_blocking), self.dtype)

    @staticmethod
    def cat(parts: list["Fp8Rows"]) -> "Fp8Rows":
        """Rows of several parts joined (one copy of bytes and scales; numpy: single-threaded)."""
        if len(parts) == 1:
            return parts[0]
        return Fp8Rows(torch.from_numpy(np.concatenate([p.q_NW.contiguous().numpy() for p in parts])),
                       torch.from_numpy(np.concatenate([p.scale_NG.contiguous().numpy() for p in parts])),
                       parts[0].dtype)
