"""DFlash's block attention (chunked fused SDPA, shared key/value heads) against the formula it replaced:
dense [Q, S] context scores masked per block, the block's own K x K scores (bidirectional, unmasked),
one fp32 softmax over both, repeat_interleave'd key/value heads. Output and gradients (inputs and
weights) in fp64, over anchor counts, context lengths, chunk sizes and masks that include rows
seeing no context at all.

Legend (shapes): B batch, S context positions, N blocks, K block size, Q = N*K block positions,
H hidden, n query heads, g key/value heads, d head dim.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from draft_trainer.methods.dflash import objective as obj
from draft_trainer.methods.dflash.config import DFlashConfig
from draft_trainer.methods.dflash.model import DFlashAttention, DFlashDraft, block_chunks
from draft_trainer.model.layers import apply_rope
from draft_trainer.model.precision import autocast
from draft_trainer.model.tensors import acc_dtype


def reference_attention(at: DFlashAttention, x_BQH, ctx_BSH, rope_q, rope_s, ctx_visible_BQS, K: int):
    """The DFlash block attention as model.py computed it before the chunked SDPA, op for op, except that
    its softmax upcast is to the accumulation dtype (`.float()` there would round fp64 scores to fp32)."""
    B, Q, _ = x_BQH.shape
    N = Q // K
    q_BnQd = apply_rope(at.q_norm(at._heads(at.q_proj(x_BQH), at.n)), *rope_q)
    kc_BgSd = apply_rope(at.k_norm(at._heads(at.k_proj(ctx_BSH), at.g)), *rope_s)
    vc_BgSd = at._heads(at.v_proj(ctx_BSH), at.g)
    kb_BgQd = apply_rope(at.k_norm(at._heads(at.k_proj(x_BQH), at.g)), *rope_q)
    vb_BgQd = at._heads(at.v_proj(x_BQH), at.g)
    rep = at.n // at.g
    kc_BnSd, vc_BnSd = kc_BgSd.repeat_interleave(rep, 1), vc_BgSd.repeat_interleave(rep, 1)
    kb_BnNKd = kb_BgQd.repeat_interleave(rep, 1).view(B, at.n, N, K, at.d)
    vb_BnNKd = vb_BgQd.repeat_interleave(rep, 1).view(B, at.n, N, K, at.d)
    scale = at.d ** -0.5
    sc_BnQS = (q_BnQd @ kc_BnSd.transpose(-1, -2)) * scale
    sc_BnQS = sc_BnQS.masked_fill(~ctx_visible_BQS[:, None], float("-inf"))
    sb_BnNKK = (q_BnQd.view(B, at.n, N, K, at.d) @ kb_BnNKd.transpose(-1, -2)) * scale
    s_BnQX = torch.cat([sc_BnQS, sb_BnNKK.reshape(B, at.n, Q, K)], dim=-1)
    p_BnQX = torch.softmax(s_BnQX.to(acc_dtype(s_BnQX.dtype)), dim=-1).to(q_BnQd.dtype)
    S = kc_BnSd.shape[2]
    out_BnQd = p_BnQX[..., :S] @ vc_BnSd
    out_BnQd = out_BnQd + (p_BnQX[..., S:].reshape(B, at.n, N, K, K) @ vb_BnNKd).reshape(B, at.n, Q, at.d)
    return at.o_proj(out_BnQd.transpose(1, 2).reshape(B, Q, at.n * at.d))


def _setup(B: int, S: int, N: int, K: int, mask: str, seed: int):
    torch.manual_seed(seed)
    cfg = DFlashConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=2,
                       head_dim=8, intermediate_size=64, vocab_size=50, draft_vocab_size=50, target_layer_ids=[1],
                       num_target_layers=4, block_size=K, mask_token_id=49)
    model = DFlashDraft(cfg).double()
    for p in model.parameters():      # norms away from 1 so their gradients mean something
        p.data.add_(torch.randn_like(p) * 0.3)
    Q = N * K
    if mask == "random":              # arbitrary per-block visibility, some blocks see nothing, some all
        vis_BNS = torch.rand(B, N, S) < 0.5
        vis_BNS[:, 0] = False
        vis_BNS[:, -1] = True
        vis_BQS = vis_BNS.repeat_interleave(K, 1)
    else:                             # training's: s < anchor, anchor 0 present; "padded": real tokens < S - 3
        anchors_BN = torch.sort(torch.randint(0, S, (B, N)), 1).values
        anchors_BN[:, 0] = 0
        real_BS = torch.ones(B, S)
        if mask == "padded":
            real_BS[:, S - 3:] = 0
            anchors_BN[-1] = 0        # a sample with no kept blocks (all anchors 0)
        vis_BQS = obj.context_visibility(anchors_BN, real_BS, K)
    x_BQH = torch.randn(B, Q, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    ctx_BSH = torch.randn(B, S, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    pos_q_BQ = torch.randint(0, 4 * S, (B, Q))
    rope_q, rope_s = model.rope(pos_q_BQ, torch.float64), model.rope(torch.arange(S)[None].expand(B, S), torch.float64)
    return model.layers[0].self_attn, x_BQH, ctx_BSH, rope_q, rope_s, vis_BQS


def _grads(at, out, dout, inputs):
    params = [p for _, p in sorted(at.named_parameters())]
    return torch.autograd.grad(out, list(inputs) + params, dout)


@pytest.mark.parametrize("B,S,N,K,rows,mask", [
    (2, 23, 7, 4, 8, "anchors"),      # 2 blocks per chunk, a half last chunk
    (2, 23, 7, 4, 6, "anchors"),      # rows not a multiple of K: whole blocks only (1 per chunk)
    (1, 40, 5, 4, 256, "anchors"),    # one chunk
    (3, 17, 9, 3, 9, "padded"),       # padded context, a sample without kept blocks
    (2, 31, 6, 5, 10, "random"),
    (2, 1, 3, 4, 4, "anchors"),       # one context position, seen by no block
    (1, 12, 1, 2, 256, "random"),     # the drafter's shape: one block seeing all the context
])
def test_chunked_attention_equals_the_dense_formula_with_gradients(B, S, N, K, rows, mask):
    at, x, ctx, rq, rs, vis = _setup(B, S, N, K, mask, seed=S * 100 + N)
    assert N == 1 or (~vis).all(-1).any(), "some rows must see no context at all"
    chunks = block_chunks(vis, K, rows)
    assert len(chunks.spans) == -(-N // max(1, rows // K))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):   # on CPU the fused kernel takes these inputs
        ours = at(x, ctx, rq, rs, chunks)
    ref = reference_attention(at, x, ctx, rq, rs, vis, K)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12), (ours - ref).abs().max()
    dout = torch.randn_like(ours)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        g_ours = _grads(at, ours, dout, (x, ctx))
    g_ref = _grads(at, ref, dout, (x, ctx))
    names = ["x", "ctx"] + [n for n, _ in sorted(at.named_parameters())]
    for name, a, b in zip(names, g_ours, g_ref):
        assert b.abs().max() > 0 or (name == "ctx" and not vis.any()), name
        assert torch.allclose(a, b, rtol=0, atol=1e-11), (name, (a - b).abs().max())
    # The comparison sees a one-column shift of the context mask (a block also seeing its anchor).
    shifted = vis.clone()
    shifted[..., 1:] |= vis[..., :-1]
    if S > 1 and not torch.equal(shifted, vis):
        off = reference_attention(at, x, ctx, rq, rs, shifted, K)
        assert (off - ours).abs().max() > 1e-3


def test_a_block_sees_its_own_block_both_ways_and_no_other_block():
    at, x, ctx, rq, rs, vis = _setup(1, 10, 4, 4, "anchors", seed=3)
    chunks = block_chunks(vis, 4, 16)       # all 4 blocks in one chunk: masking alone keeps them apart
    out = at(x, ctx, rq, rs, chunks)
    x2 = x.detach().clone()
    x2[0, 9] += 1.0                         # block 2, position 1
    out2 = at(x2, ctx, rq, rs, chunks)
    moved_Q = (out2 - out).abs().amax(-1)[0] > 1e-9
    assert moved_Q.tolist() == [False] * 8 + [True] * 4 + [False] * 4   # its block only, position 0 included


def test_chunks_keep_only_the_context_columns_their_rows_see():
    anchors_BN = torch.tensor([[0, 3, 5, 9], [2, 2, 7, 8]])
    vis = obj.context_visibility(anchors_BN, torch.ones(2, 12), 2)
    chunks = block_chunks(vis, 2, 4)                        # 2 blocks per chunk
    assert chunks.spans == [(0, 4), (4, 8)]
    assert chunks.ctx_len == [3, 9]                         # the chunk's largest anchor over the batch
    assert [tuple(m.shape) for m in chunks.masks] == [(2, 1, 4, 7), (2, 1, 4, 13)]
    assert torch.equal(chunks.masks[1][0, 0, :, 9:].int(), torch.tensor([[1, 1, 0, 0]] * 2 + [[0, 0, 1, 1]] * 2))


def test_block_positions_that_are_not_whole_blocks_are_refused():
    with pytest.raises(ValueError, match="not whole blocks of 4"):
        block_chunks(torch.ones(1, 6, 5, dtype=torch.bool), 4)


def test_under_bf16_autocast_it_is_as_close_to_fp64_as_the_dense_formula():
    """Training's precision: the fused kernel accumulates in fp32 where the dense formula rounded its scores
    and probabilities to bf16, so its output and gradients (relative max error against fp64) must be as
    close to the fp64 result."""
    at, x, ctx, rq, rs, vis = _setup(2, 40, 8, 4, "anchors", seed=5)
    exact = reference_attention(at, x, ctx, rq, rs, vis, 4)
    dout = torch.randn_like(exact)
    g_exact = _grads(at, exact, dout, (x, ctx))
    at32 = copy.deepcopy(at).float()
    x32, ctx32 = x.detach().float().requires_grad_(), ctx.detach().float().requires_grad_()
    rq32, rs32 = tuple(t.float() for t in rq), tuple(t.float() for t in rs)
    errs = {}
    for name in ("ours", "dense"):
        with autocast("cpu", torch.bfloat16):
            if name == "ours":
                out = at32(x32, ctx32, rq32, rs32, block_chunks(vis, 4, 8))
            else:
                out = reference_attention(at32, x32, ctx32, rq32, rs32, vis, 4)
        assert out.dtype == torch.bfloat16
        grads = _grads(at32, out, dout.to(out.dtype), (x32, ctx32))
        errs[name] = [float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip((out.detach(),) + grads,
                                                                                         (exact.detach(),) + g_exact)]
    # Both are ~1% off (the bf16 projections dominate); per tensor the two trade places, so the mean.
    assert max(errs["ours"]) < 0.03, errs
    assert sum(errs["ours"]) <= 1.25 * sum(errs["dense"]), errs
