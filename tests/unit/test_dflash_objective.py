"""DFlash's objective and model against slow, direct references written from the rules
(SpecForge's specforge/core/dflash.py: anchors, block mask, labels, decay weights) and the
export layout SGLang 0.5.23 reads."""

from __future__ import annotations

import math

import pytest
import torch

from draft_trainer.methods.dflash import objective as obj
from draft_trainer.methods.dflash.config import DFlashConfig, reference_layer_ids, target_layers_for
from draft_trainer.methods.dflash.model import DFlashDraft


def _cfg(**kw) -> DFlashConfig:
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                intermediate_size=48, vocab_size=50, draft_vocab_size=50, target_layer_ids=[1, 2, 3],
                num_target_layers=6, block_size=4, mask_token_id=49)
    base.update(kw)
    return DFlashConfig(**base)


def test_target_layers_follow_the_reference_formula():
    # z-lab Qwen3-8B (36 layers, 5 draft layers) reads [1, 9, 17, 25, 33].
    assert reference_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert reference_layer_ids(28, 1) == [14]
    assert target_layers_for(8) == (5, [1, 2, 3, 4, 5])
    # Too shallow for distinct layers in [1, L-3]: one draft layer reading L//2, the reference's 1-layer rule.
    assert target_layers_for(4) == (1, [2])
    assert target_layers_for(6) == (3, [1, 2, 3])


def test_anchors_are_distinct_valid_sorted_and_reproducible():
    lm = torch.zeros(3, 20)
    lm[0, 2:18] = 1
    lm[1, 5:7] = 1
    # sample 2: no valid anchor
    a1, k1 = obj.sample_anchors(lm, 4, 8, obj.batch_generator([1, 2, 3]))
    a2, k2 = obj.sample_anchors(lm, 4, 8, obj.batch_generator([1, 2, 3]))
    assert torch.equal(a1, a2) and torch.equal(k1, k2)
    assert k1.sum(1).tolist() == [8, 2, 0]
    for b in range(3):
        got = a1[b][k1[b]].tolist()
        assert got == sorted(set(got))
        assert all(lm[b, a] == 1 and a <= 20 - 4 for a in got)
    a3, _ = obj.sample_anchors(lm, 4, 8, obj.batch_generator([4, 5, 6]))
    assert not torch.equal(a1, a3)


def _slow_dense_mask(anchors, keep, S, K):
    """[B, Q, S + Q] from the rules, one entry at a time."""
    B, N = anchors.shape
    m = torch.zeros(B, N * K, S + N * K, dtype=torch.bool)
    for b in range(B):
        for q in range(N * K):
            n = q // K
            if not keep[b, n]:
                continue
            for kv in range(S + N * K):
                if kv < S:
                    m[b, q, kv] = kv < anchors[b, n]
                else:
                    m[b, q, kv] = (kv - S) // K == n
    return m


def _slow_forward(model: DFlashDraft, feats, noise, pos_ctx, pos_q, mask):
    """The draft with one dense [Q, S + Q] mask and plain SDPA per layer (the reference's formulation)."""
    from draft_trainer.model.layers import apply_rope

    ctx = model.project_context(feats)
    h = noise
    rq, rs = model.rope(pos_q, h.dtype), model.rope(pos_ctx, h.dtype)
    rope_all = tuple(torch.cat([a, b], 1) for a, b in zip(rs, rq))
    for layer in model.layers:
        at = layer.self_attn
        x = layer.input_layernorm(h)
        q = apply_rope(at.q_norm(at._heads(at.q_proj(x), at.n)), *rq)
        kv_in = torch.cat([ctx, x], 1)
        k = apply_rope(at.k_norm(at._heads(at.k_proj(kv_in), at.g)), *rope_all)
        v = at._heads(at.v_proj(kv_in), at.g)
        rep = at.n // at.g
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        h = h + at.o_proj(o.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.norm(h)


def test_block_attention_equals_a_dense_masked_reference():
    torch.manual_seed(0)
    cfg = _cfg()
    model = DFlashDraft(cfg).double()
    B, T, K = 2, 12, cfg.block_size
    ids = torch.randint(0, 48, (B, T))
    lm = torch.ones(B, T)
    anchors, keep = obj.sample_anchors(lm, K, 3, obj.batch_generator([7, 8]))
    tg = obj.block_targets(ids, lm, anchors, keep, K, cfg.mask_token_id, 7.0)
    feats = torch.randn(B, T, 3 * cfg.hidden_size, dtype=torch.float64)
    emb = torch.randn(cfg.vocab_size, cfg.hidden_size, dtype=torch.float64)
    noise = emb[tg.noise_ids_BQ]
    pos_ctx = torch.arange(T)[None].expand(B, T)
    vis = obj.context_visibility(anchors, torch.ones(B, T), K)
    fast = model(feats, noise, pos_ctx, tg.pos_q_BQ, vis)
    dense = _slow_dense_mask(anchors, keep, T, K)
    assert torch.equal(dense[..., :T], vis & keep.repeat_interleave(K, 1)[..., None])
    # Anchors at 0 see no context: the dense reference then attends to the block alone, as ours.
    slow = _slow_forward(model, feats, noise, pos_ctx, tg.pos_q_BQ, dense)
    assert torch.allclose(fast, slow, atol=1e-10)
    # A change to a feature at or after a block's anchor must not move that block's output.
    a = int(anchors[0, 0])
    feats2 = feats.clone()
    feats2[0, a:] += 1.0
    moved = model(feats2, noise, pos_ctx, tg.pos_q_BQ, vis)
    assert torch.allclose(moved[0, :K], fast[0, :K], atol=1e-10)


def test_labels_weights_and_loss_against_a_direct_loop():
    torch.manual_seed(1)
    B, T, K, V, H, gamma = 2, 10, 4, 30, 8, 3.0
    ids = torch.randint(0, V, (B, T))
    lm = (torch.rand(B, T) > 0.3).float()
    anchors, keep = obj.sample_anchors(lm, K, 5, obj.batch_generator([1, 9]))
    tg = obj.block_targets(ids, lm, anchors, keep, K, 29, gamma)
    hidden = torch.randn(B, anchors.shape[1] * K, H, dtype=torch.float64)
    head = torch.randn(V, H, dtype=torch.float64)
    loss, stats = obj.block_loss(hidden, head, tg, None)
    num = den = 0.0
    n_k = [0.0] * (K - 1)
    for b in range(B):
        for n in range(anchors.shape[1]):
            if not keep[b, n]:
                continue
            a = int(anchors[b, n])
            assert tg.noise_ids_BQ[b, n * K] == ids[b, a] and (tg.noise_ids_BQ[b, n * K + 1:(n + 1) * K] == 29).all()
            for k in range(1, K):
                if a + k >= T or lm[b, a + k] == 0:
                    continue
                w = math.exp(-(k - 1) / gamma)
                logp = torch.log_softmax(hidden[b, n * K + k] @ head.t(), -1)
                num += -float(logp[ids[b, a + k]]) * w
                den += w
                n_k[k - 1] += 1
    assert loss.item() == pytest.approx(num / den, rel=1e-6)  # weights are fp32
    assert stats.positions == n_k
    assert obj.decay_weights(4, gamma)[:2] == [0.0, 1.0]


@pytest.mark.parametrize("kind", ["kl", "lk_lambda"])
@pytest.mark.parametrize("train_head", [False, True])
def test_block_loss_gradients_equal_autograd_over_the_direct_formula(kind, train_head):
    """The chunked head (LinearSoftCE, gradients formed in forward) against autograd over dense
    log-softmax logits: the loss and d/d(hidden) in fp64; d/d(head) only when the head trains
    (the target's frozen head gets none, and its [V,H] product is skipped)."""
    from draft_trainer.model.objective import Objective, objective_rows

    torch.manual_seed(4)
    B, T, K, V, H, gamma = 2, 12, 4, 37, 8, 3.0
    ids = torch.randint(0, V, (B, T))
    lm = (torch.rand(B, T) > 0.25).float()
    anchors, keep = obj.sample_anchors(lm, K, 6, obj.batch_generator([2, 5]))
    tg = obj.block_targets(ids, lm, anchors, keep, K, V - 1, gamma)
    hidden = torch.randn(B, anchors.shape[1] * K, H, dtype=torch.float64, requires_grad=True)
    head = torch.randn(V, H, dtype=torch.float64).requires_grad_(train_head)
    o = Objective(kind)
    loss, stats = obj.block_loss(hidden, head, tg, 7.5, compute_dtype=None, objective=o)
    loss.backward()

    h2 = hidden.detach().clone().requires_grad_()
    w2 = head.detach().clone().requires_grad_(train_head)
    sel = tg.valid_BNK > 0
    logits = h2.view(B, -1, K, H)[sel] @ w2.t()
    labels = tg.labels_BNK[sel]
    per_row, _, _ = objective_rows(logits, o, ids_cK=labels[:, None], pk_cK=torch.ones(labels.numel(), 1,
                                                                                         dtype=torch.float64))
    want = (per_row * tg.weight_BNK[sel].double()).sum() / 7.5
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=1e-9, atol=1e-12)
    if train_head:
        torch.testing.assert_close(head.grad, w2.grad, rtol=1e-9, atol=1e-12)
    else:
        assert head.grad is None
    right = (logits.argmax(-1) == labels).double()
    assert sum(stats.sums["right"]) == pytest.approx(float(right.sum()))


def test_chain_metrics_stop_at_the_first_wrong_position():
    valid = torch.ones(1, 2, 4)
    right = torch.tensor([[[0, 1, 0, 1], [0, 1, 1, 1]]], dtype=torch.float)
    z = torch.zeros(1, 2, 4)
    st = obj.block_stats(valid, z, right, z)
    assert st.acc == [1.0, 0.5, 1.0]
    assert st.cond_acc == [1.0, 0.5, 1.0]
    assert st.sums["prev"] == [2.0, 2.0, 1.0]


def test_the_drafter_proposes_what_training_scores_at_the_same_anchor():
    """Training (a block at anchor a over context < a) and the eval drafter (context = the
    committed prefix, anchor = the last committed token) must be the same computation, or the
    draft learns one alignment and serves another."""
    from draft_trainer.methods.dflash.drafter import DFlashDrafter

    torch.manual_seed(3)
    cfg = _cfg()
    model = DFlashDraft(cfg).eval()
    T, K, a = 14, cfg.block_size, 9
    ids = torch.randint(0, 48, (1, T))
    feats = torch.randn(1, T, 3 * cfg.hidden_size)
    emb, head = torch.randn(cfg.vocab_size, cfg.hidden_size), torch.randn(cfg.vocab_size, cfg.hidden_size)
    anchors, keep = torch.tensor([[a]]), torch.tensor([[True]])
    tg = obj.block_targets(ids, torch.ones(1, T), anchors, keep, K, cfg.mask_token_id, 7.0)
    with torch.no_grad():
        h = model(feats, emb[tg.noise_ids_BQ], torch.arange(T)[None], tg.pos_q_BQ,
                  obj.context_visibility(anchors, torch.ones(1, T), K))
    trained = (h[0, 1:] @ head.t()).argmax(-1).tolist()
    drafter = DFlashDrafter(model, emb, head)
    drafter.start(ids[0, :a].tolist(), int(ids[0, a]), feats[0, :a])  # prompt = ids[:a], target's next = ids[a]
    assert drafter.propose(K - 1) == trained
    # After a round that commits two more tokens, the next block is the one anchored two later.
    drafter.extend(ids[0, a + 1:a + 3].tolist(), feats[0, a:a + 2])
    anchors2 = torch.tensor([[a + 2]])
    tg2 = obj.block_targets(ids, torch.ones(1, T), anchors2, keep, K, cfg.mask_token_id, 7.0)
    with torch.no_grad():
        h2 = model(feats, emb[tg2.noise_ids_BQ], torch.arange(T)[None], tg2.pos_q_BQ,
                   obj.context_visibility(anchors2, torch.ones(1, T), K))
    assert drafter.propose(K - 1) == (h2[0, 1:] @ head.t()).argmax(-1).tolist()
    # as a tree: the same chain, and at each position the block's next-best tokens in order
    chain, alts = drafter.propose_tree(K - 1, 3)
    assert chain == (h2[0, 1:] @ head.t()).argmax(-1).tolist()
    assert alts == (h2[0, 1:] @ head.t()).topk(3, dim=-1).indices[:, 1:].tolist()
    # A confidence-stopped block keeps the prefix whose product of top-1 probabilities stays above
    # the threshold: every cut point between 0 and the whole block is reachable.
    logits_KV = h2[0, 1:] @ head.t()
    conf = [1.0] + logits_KV.softmax(-1).amax(-1).cumprod(0).tolist() + [0.0]
    for n in range(K):
        c = (conf[n] + conf[n + 1]) / 2
        assert drafter.propose(K - 1, c) == logits_KV.argmax(-1).tolist()[:n], (n, c)
