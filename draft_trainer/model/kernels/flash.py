"""Flash attention with its log-sum-exp, per device, behind one contract (used by the fused TTT).

Legend (shapes): B batch, T sequence length, n query heads, k key/value heads, d head_dim.

Contract of a kernel (what `TTTAttention` relies on, checked by tests/unit/test_flash_kernels.py
on CPU and by tests/gpu/test_flash_cuda_contract.py wherever CUDA exists):
  fwd(q_BnTd, k_BkTd, v_BkTd, mask_B1TT, causal, scale) -> (o_BnTd, lse_BnT, state)
      o = softmax(q k^T * scale + mask | causal) v;  lse_BnT = the row log-sum-exp of those
      scaled scores, natural log, [B, n, T] exactly (no padding), float32 (float64 for fp64).
  bwd(do_BnTd, q, k, v, o_BnTd, lse_BnT, mask, causal, scale, state) -> (dq, dk, dv)
      with P = exp(S - lse) and D = rowsum(do * o) taken from the *given* o and lse (not the
      ones fwd returned): handing it a merged o / lse gives the gradients of this block inside a
      larger softmax. `state` is what fwd returned (RNG offsets, which CUDA op ran).
  `native_gqa`: the kernel takes k < n heads (else the caller repeats k/v and sums dk/dv).

Kernels: CPU's aten flash op; CUDA's flash op (bf16/fp16, no mask) or memory-efficient op
(any float, additive mask); `MathKernel` (plain torch, one [T, T] block alive at a time, nothing
of size T^2 kept for backward) for every other case (fp64, MPS/XPU, old GPUs).
"""

from __future__ import annotations

import torch

_LSE_ALIGN_EFFICIENT = 32   # the memory-efficient CUDA op pads lse's last dim to a multiple of 32
_BIAS_ALIGN = 16            # and wants its additive bias's last dim padded to a multiple of 16


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class CpuFlash:
    name = "cpu-flash"
    native_gqa = True

    def fwd(self, q, k, v, mask, causal, scale):
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        return o, lse, None

    def bwd(self, do, q, k, v, o, lse, mask, causal, scale, state):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, causal, attn_mask=mask, scale=scale)


class CudaFlash:
    """Thin wrapper over CUDA's SDPA kernels; only the lse layout and the op's extras are handled."""

    name = "cuda-sdpa"
    native_gqa = False   # the efficient op needs equal heads; the caller repeats k/v for both ops

    @staticmethod
    def use_flash(q, mask) -> bool:
        d = q.shape[-1]
        return mask is None and q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256

    def fwd(self, q, k, v, mask, causal, scale):
        T = q.shape[2]
        if self.use_flash(q, mask):
            o, lse, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, causal, False, scale=scale)
            return o, lse[..., :T], ("flash", cq, ck, mq, mk, seed, offset)
        bias = cuda_bias(mask, q.shape[1])
        o, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, causal and bias is None, scale=scale)
        return o, lse[..., :T], ("efficient", bias, seed, offset, lse.shape[-1])

    def bwd(self, do, q, k, v, o, lse, mask, causal, scale, state):
        if state[0] == "flash":
            _, cq, ck, mq, mk, seed, offset = state
            return torch.ops.aten._scaled_dot_product_flash_attention_backward(
                do, q, k, v, o, lse.contiguous(), cq, ck, mq, mk, 0.0, causal, seed, offset, scale=scale)
        _, bias, seed, offset, lse_len = state
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            do, q, k, v, bias, o, pad_lse(lse, lse_len), seed, offset, 0.0, [True, True, True, False],
            causal and bias is None, scale=scale)
        return dq, dk, dv


def pad_lse(lse_BnT: torch.Tensor, length: int) -> torch.Tensor:
    """[B, n, T] -> [B, n, length] (the padded layout the efficient op's backward reads; pad = 0)."""
    T = lse_BnT.shape[-1]
    if length == T:
        return lse_BnT.contiguous()
    out = lse_BnT.new_zeros(*lse_BnT.shape[:-1], length)
    out[..., :T] = lse_BnT
    return out


def cuda_bias(mask_B1TT: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Additive mask as the efficient op wants it: [B, n, T, S] (heads broadcast by a 0 stride),
    the last dim's storage padded to a multiple of 16 elements (sliced back, so values unchanged)."""
    if mask_B1TT is None:
        return None
    B, _, T, S = mask_B1TT.shape
    S_pad = -(-S // _BIAS_ALIGN) * _BIAS_ALIGN
    store = mask_B1TT.new_zeros(B, 1, T, S_pad)
    store[..., :S] = mask_B1TT
    return store[..., :S].expand(B, n, T, S)


class MathKernel:
    """Plain torch, any device and dtype; keeps nothing of size T^2 (backward recomputes S)."""

    name = "math"
    native_gqa = False

    @staticmethod
    def _scores(q, k, mask, causal, scale):
        acc = _acc(q.dtype)
        s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
        if mask is not None:
            s = s + mask.to(acc)
        elif causal:
            T, S = s.shape[-2:]
            s = s.masked_fill(torch.ones(T, S, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        return s

    def fwd(self, q, k, v, mask, causal, scale):
        s = self._scores(q, k, mask, causal, scale)
        lse = torch.logsumexp(s, -1)
        o = torch.matmul(torch.exp(s - lse[..., None]), v.to(s.dtype))
        return o.to(q.dtype), lse, None

    def bwd(self, do, q, k, v, o, lse, mask, causal, scale, state):
        acc = _acc(q.dtype)
        p = torch.exp(self._scores(q, k, mask, causal, scale) - lse.to(acc)[..., None])
        do32 = do.to(acc)
        dv = torch.matmul(p.transpose(-1, -2), do32)
        D = (do32 * o.to(acc)).sum(-1, keepdim=True)
        ds = p * (torch.matmul(do32, v.to(acc).transpose(-1, -2)) - D)
        dq = torch.matmul(ds, k.to(acc)) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q.to(acc)) * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def kernel_for(q: torch.Tensor):
    """The flash kernel for q's device and dtype (one place decides)."""
    if q.device.type == "cpu":
        return CpuFlash()
    if q.device.type == "cuda" and q.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return CudaFlash()
    return MathKernel()
