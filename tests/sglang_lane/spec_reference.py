"""Reference EAGLE-3 chain speculative decoding (greedy, top-k 1) with our Eagle3Draft and an
HF target: the acceptance length SGLang should reproduce when it serves our exported draft.

Stands in for draft_trainer/eval.py until that lands on main. Same convention as SGLang's
`spec_accept_length`: completion tokens / verify passes (the token produced by the prefill is
counted, the prefill is not a verify pass).

One round, after the prefix x[0..n-1] and the draft's cache over positions 0..n-2:
  draft extend : positions n-1.. with target features f and next tokens -> draft token d1
  draft steps  : feed (own hidden g', d_k) at the next position -> d2 .. dK
  verify       : target over [x_n-1's successor..] = [t, d1..dK] -> argmax a0..aK; accept the
                 longest prefix with d_i == a_{i-1}, plus the bonus token a_m
  the draft cache is cut back to the verified prefix and rebuilt from target features.
Legend: T tokens, H target hidden, h draft hidden, Vd draft vocab.
"""

from __future__ import annotations

import torch

from draft_trainer.model.draft import Eagle3Draft, KVCache


class TargetOracle:
    """HF target, full recompute per call (tiny models): aux features and greedy next tokens."""

    def __init__(self, model_dir, aux_layer_ids: list[int]) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.aux = aux_layer_ids

    @torch.no_grad()
    def __call__(self, ids: list[int]) -> tuple[torch.Tensor, list[int]]:
        out = self.model(torch.tensor([ids]), output_hidden_states=True)
        aux_T3H = torch.cat([out.hidden_states[i + 1][0] for i in self.aux], dim=-1)
        return aux_T3H, out.logits[0].argmax(-1).tolist()


@torch.no_grad()
def speculative_generate(target: TargetOracle, draft: Eagle3Draft, prompt: list[int], max_new_tokens: int,
                         num_steps: int = 3) -> tuple[list[int], float]:
    """Greedy chain speculative decoding; returns (new tokens, accepted tokens per verify pass)."""
    ids = list(prompt)
    aux_T3H, greedy = target(ids)
    ids.append(greedy[-1])  # the prefill's token
    new, verifies = 1, 0
    cache = KVCache()
    feats = aux_T3H  # target features for positions 0..len(ids)-2 not yet in the draft cache
    start = 0  # first position of `feats`
    while new < max_new_tokens:
        # Draft extend: positions start..len(ids)-2 read target features and the next tokens.
        pos = torch.arange(start, len(ids) - 1)[None]
        emb = draft.embed_tokens(torch.tensor([ids[start + 1 :]]))
        g = draft.step(emb, draft.fc(feats[None]), pos, cache)
        drafts = []
        last_g = g[:, -1:]
        for k in range(num_steps):
            d = int(draft.draft_to_target(draft.logits(last_g)[0, -1].argmax()))
            drafts.append(d)
            if k + 1 == num_steps:
                break
            p = torch.tensor([[len(ids) - 1 + k]])  # the position after the last extended one, then on
            last_g = draft.step(draft.embed_tokens(torch.tensor([[d]])), last_g, p, cache)
        # Verify: the target's greedy tokens after ids + drafts.
        aux_all, greedy = target(ids + drafts)
        verifies += 1
        base = len(ids) - 1  # greedy[base] predicts the token after ids[-1]
        m = 0
        while m < num_steps and drafts[m] == greedy[base + m]:
            m += 1
        accepted = drafts[:m] + [greedy[base + m]]
        # Draft cache: keep positions 0..len(ids)-2 (computed from target features); positions
        # from len(ids)-1 on are recomputed next round from the verified target features.
        cache.truncate(len(ids) - 1)
        start = len(ids) - 1
        ids += accepted
        new += len(accepted)
        feats = aux_all[start : len(ids) - 1]
    generated = ids[len(prompt) :][:max_new_tokens]
    return generated, len(generated) / max(verifies, 1)
