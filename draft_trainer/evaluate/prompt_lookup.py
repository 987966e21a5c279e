"""Prompt-lookup (n-gram) drafting: the free baseline a trained draft has to beat.

Standard prompt lookup decoding (Saxena 2023; `prompt_lookup_num_tokens` in transformers, the
`ngram` method in vLLM): take the last n committed tokens, n from `max_ngram` down to
`min_ngram`; at the first n whose n-gram occurred earlier in the committed sequence (prompt and
generated tokens), propose the tokens that followed that occurrence. This one takes the most
recent earlier occurrence (the one nearest the end, which follows a repetition the output is
in), and proposes nothing when no n-gram matches (the round is then a plain decoding step).

Lookups are O(1) per round: for every n, a dict maps each n-gram to the end of its latest
occurrence that is not the current suffix itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PromptLookupDrafter:
    name = "prompt_lookup"
    feature_layers: tuple[int, ...] = ()

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.ctx: list[int] = []
        self._latest: dict[int, dict[tuple[int, ...], int]] = {}

    def start(self, prompt: Sequence[int], first_token: int, feats_SF: torch.Tensor | None = None) -> None:
        self.ctx = []
        self._latest = {n: {} for n in range(self.min_ngram, self.max_ngram + 1)}
        self.extend(list(prompt) + [first_token], None)

    def extend(self, tokens: Sequence[int], feats_SF: torch.Tensor | None = None) -> None:
        ctx = self.ctx
        for t in tokens:
            # The n-grams ending at the current end stop being the suffix once t is appended.
            end = len(ctx)
            for n, table in self._latest.items():
                if end >= n:
                    table[tuple(ctx[end - n : end])] = end
            ctx.append(t)

    def propose(self, max_tokens: int, min_confidence: float = 0.0) -> list[int]:  # n-grams have no confidence
        ctx, L = self.ctx, len(self.ctx)
        for n in range(min(self.max_ngram, L), self.min_ngram - 1, -1):
            end = self._latest[n].get(tuple(ctx[L - n :]))
            if end is not None:
                return ctx[end : end + max_tokens]
        return []
