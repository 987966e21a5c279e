"""Training-time test (TTT) with one fused attention per step: the fast path, equal to
`Eagle3Draft.ttt_forward` (the reference) in forward and gradients (tests/unit/test_ttt_fused.py).

Legend (shapes): B batch, T sequence length, h draft hidden, n query heads, kv key/value heads,
d head_dim, j index of a TTT step >= 1 (its "diagonal" keys); in grouped views g = kv (key heads)
and r = n // kv (the query heads sharing one).

At step k the query at position t attends, inside one softmax, to the step-0 keys 0..t (causal)
and to the step-j keys at position t only, for j = 1..k. We split that softmax in two parts and
merge them exactly with log-sum-exp:
  - the causal part is a flash attention over the step-0 keys, which returns its output o0 and
    its log-sum-exp lse0 and keeps no [T, T] score matrix (O(T) memory, not O(T^2));
  - the diagonal part is k dot products per position (sd_j = q . k_j[t]).
  lse = logsumexp(lse0, sd_1..sd_k);  o = e^(lse0 - lse) o0 + sum_j e^(sd_j - lse) v_j[t].
Backward: flash attention's backward recomputes P = exp(S - lse) from the lse it is given and
uses D = rowsum(dO * O). Handing it the *merged* output and lse makes it produce exactly the
gradients of the step-0 block inside the merged softmax; the diagonal terms are done by hand.
Nothing of size T^2 x K is kept for backward (the reference keeps K score matrices).

This merge and its backward are written once for every device; only the flash kernel differs
(model/kernels/flash.py: CPU's aten flash op, CUDA's flash / memory-efficient SDPA ops, a plain
torch kernel elsewhere), chosen by `kernel_for` from q's device and dtype.
"""

from __future__ import annotations

import torch

from draft_trainer.model.kernels.flash import kernel_for
from draft_trainer.model.tensors import acc_dtype, shift_left



def key_padding_mask(attention_mask_BT: torch.Tensor | None, T: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive [B,1,T,T] mask for step-0 keys, or None when causal alone is exact.

    With right padding (what `collate` produces) causal masking already keeps real queries off
    padded keys, so no mask is materialised. Otherwise padded keys are masked, except a query's
    own key, so that a padded query row is never empty (no NaN; its loss weight is 0 anyway).
    """
    if attention_mask_BT is None:
        return None
    m = attention_mask_BT.bool()
    right_padded = bool((m[:, 1:] <= m[:, :-1]).all())
    if right_padded:
        return None
    idx = torch.arange(T, device=m.device)
    ok_BTT = (idx[None, :, None] >= idx[None, None, :]) & (m[:, None, :] | (idx[:, None] == idx[None, :])[None])
    return torch.zeros(ok_BTT.shape, dtype=dtype, device=m.device).masked_fill_(~ok_BTT, float("-inf"))[:, None]


class TTTAttention(torch.autograd.Function):
    """o = softmax over [causal step-0 keys | diagonal keys of steps 1..k] applied to the values."""

    @staticmethod
    def forward(ctx, kern, scale: float, mask_B1TT, q_BnTd, k0_BkTd, v0_BkTd, *diag):
        nd = len(diag) // 2
        kd, vd = diag[:nd], diag[nd:]
        causal = mask_B1TT is None
        rep = q_BnTd.shape[1] // k0_BkTd.shape[1]
        kern = kern or kernel_for(q_BnTd)
        krep = 1 if kern.native_gqa else rep
        o0_BnTd, lse0_BnT, state = kern.fwd(q_BnTd, _rep(k0_BkTd, krep), _rep(v0_BkTd, krep), mask_B1TT, causal, scale)
        acc = acc_dtype(q_BnTd.dtype)
        lse0_BnT = lse0_BnT.to(acc)
        # Diagonal terms on the grouped view [B, kv, rep, T, d]: keys/values broadcast over the
        # `rep` query heads that share them (no repeat_interleave copies, K(K-1)/2 of them a step).
        q_BgrTd = _grouped(q_BnTd.to(acc), rep)
        sd = [(q_BgrTd * k.to(acc)[:, :, None]).sum(-1).flatten(1, 2) * scale for k in kd]   # each [B,n,T]
        lse_BnT = torch.logsumexp(torch.stack([lse0_BnT, *sd]), dim=0) if sd else lse0_BnT
        o = o0_BnTd.to(acc) * torch.exp(lse0_BnT - lse_BnT)[..., None]
        o_BgrTd = _grouped(o, rep)
        for s, v in zip(sd, vd):
            o_BgrTd.addcmul_(_grouped(torch.exp(s - lse_BnT)[..., None], rep), v.to(acc)[:, :, None])
        o_BnTd = o.to(q_BnTd.dtype)
        ctx.scale, ctx.causal, ctx.rep, ctx.nd, ctx.kern, ctx.krep, ctx.state = scale, causal, rep, nd, kern, krep, state
        ctx.save_for_backward(mask_B1TT, q_BnTd, k0_BkTd, v0_BkTd, o_BnTd, lse_BnT, *diag)
        return o_BnTd

    @staticmethod
    def backward(ctx, do_BnTd):
        mask_B1TT, q_BnTd, k0_BkTd, v0_BkTd, o_BnTd, lse_BnT, *diag = ctx.saved_tensors
        kd, vd = diag[: ctx.nd], diag[ctx.nd :]
        do_BnTd = do_BnTd.contiguous().to(q_BnTd.dtype)
        # Kernels take lse in their own dtype (fp32, or fp64 for fp64 inputs): the merged one is acc.
        dq, dk0, dv0 = ctx.kern.bwd(do_BnTd, q_BnTd, _rep(k0_BkTd, ctx.krep), _rep(v0_BkTd, ctx.krep), o_BnTd,
                                    lse_BnT, mask_B1TT, ctx.causal, ctx.scale, ctx.state)
        dk0, dv0 = _unrep(dk0, ctx.krep), _unrep(dv0, ctx.krep)
        acc = acc_dtype(q_BnTd.dtype)
        r = ctx.rep
        dq = dq.to(acc)                     # the kernel's fresh output: updated in place below
        do32 = do_BnTd.to(acc)
        D_BgrT = _grouped((do32 * o_BnTd.to(acc)).sum(-1), r)
        q_BgrTd, do_BgrTd, dq_BgrTd = _grouped(q_BnTd.to(acc), r), _grouped(do32, r), _grouped(dq, r)
        lse_BgrT = _grouped(lse_BnT, r)
        dkd, dvd = [], []
        for k, v in zip(kd, vd):
            k32, v32 = k.to(acc)[:, :, None], v.to(acc)[:, :, None]          # [B, kv, 1, T, d]
            p_BgrT = torch.exp((q_BgrTd * k32).sum(-1) * ctx.scale - lse_BgrT)
            ds_BgrT = p_BgrT * ((do_BgrTd * v32).sum(-1) - D_BgrT)
            dq_BgrTd.addcmul_(ds_BgrT[..., None], k32, value=ctx.scale)
            dkd.append(((ds_BgrT[..., None] * q_BgrTd).sum(2) * ctx.scale).to(k.dtype))
            dvd.append((p_BgrT[..., None] * do_BgrTd).sum(2).to(v.dtype))
        return (None, None, None, dq.to(q_BnTd.dtype), dk0.to(k0_BkTd.dtype), dv0.to(v0_BkTd.dtype), *dkd, *dvd)


def _rep(x_BkTd: torch.Tensor, rep: int) -> torch.Tensor:
    return x_BkTd if rep == 1 else x_BkTd.repeat_interleave(rep, dim=1)


def _grouped(x_Bn_: torch.Tensor, rep: int) -> torch.Tensor:
    """[B, n, ...] -> [B, n // rep, rep, ...] (a view): query heads grouped by the key head they share."""
    return x_Bn_.unflatten(1, (-1, rep))


def _unrep(x_BnTd: torch.Tensor, rep: int) -> torch.Tensor:
    if rep == 1:
        return x_BnTd
    B, n, T, d = x_BnTd.shape
    return x_BnTd.reshape(B, n // rep, rep, T, d).sum(2)


def ttt_forward_fused(model, aux_BT3H: torch.Tensor, input_ids_BT: torch.Tensor, num_steps: int,
                      attention_mask_BT: torch.Tensor | None = None, kernel=None) -> list[torch.Tensor]:
    """Same contract as `Eagle3Draft.ttt_forward` (`model` is the Eagle3Draft, which imports this
    module): the hidden output of every TTT step. `kernel`: a flash kernel from
    model/kernels/flash.py (default: the one for the inputs' device and dtype)."""
    B, T, _ = aux_BT3H.shape
    layer = model.midlayer
    attn = layer.self_attn
    g_BTh = model.project(aux_BT3H)
    dtype = g_BTh.dtype
    mask_B1TT = key_padding_mask(attention_mask_BT, T, dtype)
    base_pos = torch.arange(T, device=g_BTh.device)[None].expand(B, T)
    k0 = v0 = None
    diag_k: list[torch.Tensor] = []
    diag_v: list[torch.Tensor] = []
    outs = []
    for k in range(num_steps):
        cos, sin = model.rope(base_pos + k, dtype)
        emb_BTh = model.embed_tokens(shift_left(input_ids_BT, k)).to(dtype)
        x_BT2h = layer.attn_input(emb_BTh, g_BTh)
        q_BnTd, k_BkTd, v_BkTd = attn.qkv(x_BT2h, cos, sin)
        if k == 0:
            k0, v0 = k_BkTd, v_BkTd
        else:
            diag_k.append(k_BkTd)
            diag_v.append(v_BkTd)
        o_BnTd = TTTAttention.apply(kernel, attn.d ** -0.5, mask_B1TT, q_BnTd, k0, v0, *diag_k, *diag_v)
        out_BTh = layer.finish(g_BTh, o_BnTd.transpose(1, 2).reshape(B, T, -1))
        outs.append(out_BTh)
        g_BTh = model.feed(out_BTh)          # EAGLE-3.1 norm_output: the next step reads norm(g)
    return outs
