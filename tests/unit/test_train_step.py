"""`train_step`'s default (fused, bf16 where supported) path against the reference path."""

import torch

from draft_trainer.data.vocab import build_vocab_mapping
from draft_trainer.data.batch import Batch
from draft_trainer.methods.eagle3.step import train_step
from tests.support.eagle3 import padded_inputs, random_draft, tiny_cfg


def make_batch(cfg, lengths, seed=0):
    aux, ids, am = padded_inputs(cfg, lengths, seed=seed, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 7)
    teacher = torch.randn(*ids.shape, cfg.target_hidden_size, generator=g)
    loss_mask = (torch.rand(ids.shape, generator=g) > 0.25).float() * am
    return Batch(list(range(len(lengths))), ids, loss_mask, am, aux, teacher_BTH=teacher)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def setup(lengths, K):
    cfg = tiny_cfg(draft_vocab_size=50)
    model = random_draft(cfg, dtype=torch.float32)
    vocab = build_vocab_mapping(torch.arange(cfg.vocab_size) % 7, cfg.draft_vocab_size)
    model.set_vocab_mapping(vocab.d2t, vocab.t2d)
    head = torch.randn(cfg.vocab_size, cfg.target_hidden_size, generator=torch.Generator().manual_seed(1))
    return model, (model, make_batch(cfg, lengths), head, vocab.used, vocab.t2d, vocab.target_to_draft, K)


def test_fused_fp32_step_equals_reference_step():
    model, args = setup([20, 14, 6], 5)
    model.zero_grad()
    ref_loss, ref_stats = train_step(*args, impl="reference")
    ref_loss.backward()
    ref_g = grads(model)
    model.zero_grad()
    loss, stats = train_step(*args, precision="fp32")
    loss.backward()
    g = grads(model)
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=1e-5, atol=1e-5)
    assert stats.positions == ref_stats.positions
    assert stats.acc == ref_stats.acc and stats.cond_acc == ref_stats.cond_acc
    assert g.keys() == ref_g.keys()
    for n in g:
        torch.testing.assert_close(g[n], ref_g[n], rtol=1e-4, atol=1e-6, msg=n)


def test_bf16_step_is_close_and_keeps_fp32_master_weights():
    model, args = setup([24, 10], 4)
    ref_loss, _ = train_step(*args, precision="fp32")
    ref_loss.backward()
    ref_g = grads(model)
    model.zero_grad()
    loss, _ = train_step(*args, precision="bf16")
    loss.backward()
    assert abs(float(loss.detach()) - float(ref_loss.detach())) < 0.03 * float(ref_loss.detach())
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, n
            rel = (p.grad - ref_g[n]).norm() / ref_g[n].norm().clamp_min(1e-12)
            assert rel < 0.1, (n, float(rel))
