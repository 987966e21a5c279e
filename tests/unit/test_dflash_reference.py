"""Our DFlash export loaded by the reference implementation's own class (`dflash` 0.1.0 from PyPI,
z-lab's HF `DFlashDraftModel.from_pretrained`): same hidden states and greedy block on the same
target features, so what we export is what the published DFlash code computes. Also checks that
our layer derivation is the reference's `build_target_layer_ids`."""

from __future__ import annotations

import torch

from draft_trainer.methods.dflash.config import DFlashConfig, reference_layer_ids
from draft_trainer.methods.dflash.export import write_sglang
from draft_trainer.methods.dflash.model import DFlashDraft
from tests.support.dflash_reference import reference_model_module


def test_reference_class_loads_our_export_and_computes_our_block(tmp_path):
    ref = reference_model_module()
    for L, n in [(36, 5), (28, 5), (8, 5), (32, 3), (12, 1)]:
        assert reference_layer_ids(L, n) == ref.build_target_layer_ids(L, n), (L, n)

    cfg = DFlashConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, intermediate_size=96, vocab_size=300, draft_vocab_size=300,
                       target_layer_ids=[1, 3, 5], num_target_layers=8, block_size=8, mask_token_id=7)
    torch.manual_seed(0)
    ours = DFlashDraft(cfg)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    write_sglang(tmp_path, cfg, ours.state_dict())
    theirs = ref.DFlashDraftModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert theirs.target_layer_ids == [1, 3, 5] and theirs.block_size == 8 and theirs.mask_token_id == 7
    ours.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in ours.state_dict().items()
                          if k not in ("d2t", "t2d")}, strict=False)  # the exported (bf16) weights
    ours.eval()

    S, K, H = 9, cfg.block_size, cfg.hidden_size
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, S, 3 * H, generator=g)
    emb = torch.randn(cfg.vocab_size, H, generator=g) * 0.5
    head = torch.nn.Linear(H, cfg.vocab_size, bias=False)
    ids = torch.full((1, K), 7)
    ids[0, 0] = 123
    with torch.no_grad():
        # The reference's decode call: context positions 0..S-1 then the block at S..S+K-1, no mask.
        want = theirs(position_ids=torch.arange(S + K)[None], noise_embedding=emb[ids], target_hidden=feats)
        got = ours(feats, emb[ids], torch.arange(S)[None], torch.arange(S, S + K)[None],
                   torch.ones(1, K, S, dtype=torch.bool))
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
        assert torch.equal(head(got[:, 1:]).argmax(-1), theirs.compute_logits(want[:, 1:], head).argmax(-1))
