"""Triton kernel: fused log-softmax + soft cross-entropy, forward and backward, one row per program.

Same contract as `linear_ce.soft_ce_rows_torch` (the reference it is tested against under
TRITON_INTERPRET=1): for logits z [N,Vd] (overwritten) and a teacher p [N,Vd], returns
(ce [N], argmax [N], exp_acc [N]) and leaves softmax(z) * sum(p) - p in z. Math in fp32 registers
whatever the storage dtype (bf16 logits lose nothing extra).
Two passes over each row: an online max / sum-exp (plus p.z, sum p, argmax), then softmax,
sum min(p, q) and the gradient. No [N,Vd] temporaries; used on CUDA by `LinearSoftCE`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _soft_ce_kernel(Z, P, CE, AMAX, EA, stride_z, stride_p, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    p_row = P + row * stride_p
    m = tl.full([], float("-inf"), tl.float32)
    se = tl.zeros([], tl.float32)
    pz = tl.zeros([], tl.float32)
    sp = tl.zeros([], tl.float32)
    best_i = tl.zeros([], tl.int64)
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        ok = cols < V
        z = tl.load(z_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        p = tl.load(p_row + cols, mask=ok, other=0.0).to(tl.float32)
        bm = tl.max(z, 0)
        bi = tl.argmax(z, 0).to(tl.int64) + off
        best_i = tl.where(bm > m, bi, best_i)     # strict: the first maximum wins, like torch
        new_m = tl.maximum(m, bm)
        se = se * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), 0)
        m = new_m
        pz += tl.sum(tl.where(ok, p * z, 0.0), 0)
        sp += tl.sum(p, 0)
    lse = m + tl.log(se)
    ea = tl.zeros([], tl.float32)
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        ok = cols < V
        z = tl.load(z_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        p = tl.load(p_row + cols, mask=ok, other=0.0).to(tl.float32)
        q = tl.exp(z - lse)
        ea += tl.sum(tl.where(ok, tl.minimum(q, p), 0.0), 0)
        tl.store(z_row + cols, (q * sp - p).to(Z.dtype.element_ty), mask=ok)
    tl.store(CE + row, sp * lse - pz)
    tl.store(AMAX + row, best_i)
    tl.store(EA + row, ea)


def soft_ce_rows_triton(z_NVd: torch.Tensor, p_NVd: torch.Tensor, block: int = 4096):
    N, V = z_NVd.shape
    if z_NVd.stride(1) != 1 or p_NVd.stride(1) != 1:
        raise ValueError("soft_ce_rows_triton needs row-contiguous logits and teacher")
    ce = torch.empty(N, dtype=torch.float32, device=z_NVd.device)
    ea = torch.empty(N, dtype=torch.float32, device=z_NVd.device)
    amax = torch.empty(N, dtype=torch.long, device=z_NVd.device)
    if N:
        BLOCK = min(block, triton.next_power_of_2(V))
        _soft_ce_kernel[(N,)](z_NVd, p_NVd, ce, amax, ea, z_NVd.stride(0), p_NVd.stride(0), V, BLOCK=BLOCK)
    return ce, amax, ea
