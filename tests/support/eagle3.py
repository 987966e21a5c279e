"""Small EAGLE-3 drafts and inputs for unit tests (random weights, padded batches)."""

from __future__ import annotations

import torch

from draft_trainer.methods.eagle3.config import DraftConfig
from draft_trainer.methods.eagle3.model import Eagle3Draft


def tiny_cfg(**kw) -> DraftConfig:
    base = dict(hidden_size=32, target_hidden_size=24, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                intermediate_size=48, vocab_size=97, draft_vocab_size=40, aux_layer_ids=[0, 1, 2],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    base.update(kw)
    return DraftConfig(**base)


def random_draft(cfg: DraftConfig, seed: int = 0, dtype=torch.float64) -> Eagle3Draft:
    torch.manual_seed(seed)
    m = Eagle3Draft(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)   # not all-ones, so the norms' gradients are tested too
            else:
                p.normal_(0.0, 0.2)
    return m.to(dtype)


def padded_inputs(cfg, lengths, left=False, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    aux = torch.randn(B, T, 3 * cfg.target_hidden_size, generator=g, dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    am = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            am[b, T - n:] = 1
        else:
            am[b, :n] = 1
    ids = ids * am
    aux = aux * am[..., None]
    return aux, ids, am
