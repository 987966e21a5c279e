"""The drafter seam of the lossless evaluator: what a draft method hands `speculative_decode`.

Legend (shapes): S positions, F feature width (the chosen target layers' hidden states
concatenated, e.g. 3H for EAGLE-3).

The evaluator keeps the committed sequence x_0..x_n (x_n is the last token the target chose; it
is not yet in the target's KV cache). Each round it asks the drafter for up to K tokens that
continue the sequence, verifies them with one target forward over [x_n, d_1..d_k], and then
commits the accepted drafts and the target's bonus token. Features always travel with the
position they were computed at, and a committed token t_{p+1} is paired with the target's
features at position p (the position whose output predicted it), as in training. So:

  start(prompt, first, feats_SF):  commits prompt + [first]; feats_SF[p] = features of prompt
                                   position p (S = len(prompt)), i.e. the position before
                                   prompt[1:] + [first];
  extend(tokens, feats_SF):        commits tokens (the a accepted drafts + the bonus token);
                                   feats_SF[i] = features of the position before tokens[i]
                                   (those of x_n, d_1..d_a: what the target just verified);
  propose(k):                      up to k tokens continuing the committed sequence (fewer, or
                                   none, is allowed: the round then verifies fewer tokens).

`feature_layers` names the decoder layers whose outputs make the features (in that order;
`()` = the drafter needs none, and the target runs without capturing hidden states).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Drafter(Protocol):
    name: str
    feature_layers: tuple[int, ...]

    def start(self, prompt: Sequence[int], first_token: int, feats_SF: torch.Tensor | None) -> None:
        """A new sequence: forget the previous one, commit prompt + [first_token]."""
        ...

    def propose(self, max_tokens: int) -> list[int]:
        """Up to max_tokens draft tokens (target vocabulary ids) continuing the committed sequence."""
        ...

    def extend(self, tokens: Sequence[int], feats_SF: torch.Tensor | None) -> None:
        """Commit `tokens` after a verification (see the module doc for the feature pairing)."""
        ...
