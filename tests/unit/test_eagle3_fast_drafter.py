"""The EAGLE-3 drafter's fused fp32 decoding path (`_FastDraft`) computes what the draft model's
reference inference path (`Eagle3Draft.project / step / feed / logits`) computes, for EAGLE-3 and
EAGLE-3.1, from bf16 or fp32 weights: an unfused projection, a missing norm or a wrong split of
q|k|v or gate|up moves the hidden states far beyond the tolerance."""

from __future__ import annotations

import pytest
import torch

from draft_trainer.methods.eagle3.config import DraftConfig
from draft_trainer.methods.eagle3.drafter import Eagle3Drafter
from draft_trainer.methods.eagle3.model import Eagle3Draft, KVCache

H, V, S = 64, 300, 11


def _draft(variant31: bool, dtype: torch.dtype) -> Eagle3Draft:
    cfg = DraftConfig(hidden_size=H, target_hidden_size=H, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      intermediate_size=96, vocab_size=V, draft_vocab_size=V, aux_layer_ids=[0, 1, 2],
                      fc_norm=variant31, norm_output=variant31)
    torch.manual_seed(0)
    draft = Eagle3Draft(cfg)
    with torch.no_grad():   # norms away from 1, so that a norm left out shows
        for name, p in draft.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return draft.to(dtype).eval()


@pytest.mark.parametrize("variant31", [False, True], ids=["eagle3", "eagle3.1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@torch.no_grad()
def test_fast_path_equals_the_reference_path(variant31, dtype):
    draft = _draft(variant31, dtype)
    ref = _draft(variant31, dtype).float()     # the reference path in fp32, on the same (upcast) weights
    fast = Eagle3Drafter(draft).path
    torch.manual_seed(1)
    aux_1S3H = torch.randn(1, S, 3 * H).to(dtype)
    tokens = torch.randint(0, V, (S,)).tolist()
    cache_ref, cache_fast = KVCache(), KVCache()
    pos_1S = torch.arange(S)[None]
    g_ref = ref.step(ref.embed_tokens(torch.tensor([tokens])), ref.project(aux_1S3H), pos_1S, cache_ref)
    g_fast = fast.step(fast.embed(tokens), fast.project(aux_1S3H), pos_1S, cache_fast)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-4)
    for j in range(3):   # drafting steps: one query over the cache, fed the previous output
        tok = int(ref.logits(g_ref[:, -1:]).argmax())
        assert tok == int(fast.logits(g_fast[:, -1:]).argmax())
        torch.testing.assert_close(fast.logits(g_fast[:, -1:]), ref.logits(g_ref[:, -1:]), rtol=1e-4, atol=1e-4)
        pos_11 = torch.tensor([[S + j]])
        g_ref = ref.step(ref.embed_tokens(torch.tensor([[tok]])), ref.feed(g_ref[:, -1:]), pos_11, cache_ref)
        g_fast = fast.step(fast.embed([tok]), fast.feed(g_fast[:, -1:]), pos_11, cache_fast)
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache_fast.k_BkSd, cache_ref.k_BkSd, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache_fast.v_BkSd, cache_ref.v_BkSd, rtol=1e-4, atol=1e-4)

