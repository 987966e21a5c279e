"""The evaluator's row-wise attention (draft_trainer/evaluate/rowwise_attention.py): the same
attention as transformers' SDPA path (prefill, decode, sliding window), and a K+1-token forward
whose every row is bit-identical to 1-token steps in bf16, so bf16 speculative decoding can be
checked token for token against bf16 greedy."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, MistralConfig

from draft_trainer.evaluate import rowwise_attention

ROWWISE = rowwise_attention.register()


def _forward_chunks(model, ids_1T: torch.Tensor, prefill: int, chunks: list[int]) -> torch.Tensor:
    """Logits [T - prefill, V] of the positions after `prefill`, fed to the cached model in chunks."""
    cache = DynamicCache()
    with torch.inference_mode():
        model(ids_1T[:, :prefill], past_key_values=cache, use_cache=True)
        out, at = [], prefill
        for n in chunks:
            out.append(model(ids_1T[:, at : at + n], past_key_values=cache, use_cache=True).logits[0])
            at += n
    assert at == ids_1T.shape[1]
    return torch.cat(out)


def _load(path, dtype, impl):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=impl).eval()


def test_rowwise_equals_sdpa_attention_in_fp32(tiny_llama):
    """Same math as transformers' SDPA (prefill, one and several new tokens per forward): an off-by-one
    in the keys a row sees, or a dropped causal mask, moves the logits far beyond 1e-5."""
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (1, 40))
    ref = _forward_chunks(_load(tiny_llama, torch.float32, "sdpa"), ids, 25, [1, 6, 1, 4, 3])
    got = _forward_chunks(_load(tiny_llama, torch.float32, ROWWISE), ids, 25, [1, 6, 1, 4, 3])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():   # the prefill itself (plain causal SDPA)
        full = _load(tiny_llama, torch.float32, ROWWISE)(ids).logits[0, 25:]
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunks", [[6, 6, 3], [2, 5, 1, 7]])
def test_bf16_verification_rows_are_bit_identical_to_one_token_steps(tiny_llama, chunks):
    """What makes bf16 speculative decoding checkable: logits of a k-token forward equal, bit for bit,
    those of k 1-token forwards (greedy decoding's) at every row."""
    torch.manual_seed(1)
    ids = torch.randint(3, 500, (1, 30 + sum(chunks)))
    model = _load(tiny_llama, torch.bfloat16, ROWWISE)
    one_by_one = _forward_chunks(model, ids, 30, [1] * sum(chunks))
    chunked = _forward_chunks(model, ids, 30, chunks)
    assert torch.equal(chunked, one_by_one)


def test_sliding_window_matches_sdpa(tmp_path):
    """A sliding-window target (Mistral): decode rows see only the last `sliding_window` keys, a prefill
    longer than the window gets the window mask; equal to transformers' own masked SDPA."""
    cfg = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                        max_position_embeddings=256)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 30))
    ref = _forward_chunks(_load(tmp_path, torch.float32, "sdpa"), ids, 12, [1, 5, 1, 11])
    got = _forward_chunks(_load(tmp_path, torch.float32, ROWWISE), ids, 12, [1, 5, 1, 11])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(_load(tmp_path, torch.float32, ROWWISE)(ids).logits,
                                   _load(tmp_path, torch.float32, "sdpa")(ids).logits, rtol=1e-5, atol=1e-5)


def test_padded_batches_are_refused(tiny_llama):
    model = _load(tiny_llama, torch.float32, ROWWISE)
    with torch.inference_mode(), pytest.raises(ValueError, match="one unpadded sequence"):
        model(torch.randint(3, 500, (2, 5)), past_key_values=DynamicCache(), use_cache=True)
