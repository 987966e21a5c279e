"""Plain greedy decoding and lossless chain speculative decoding with any `Drafter`.

Legend (shapes): B = 1 (one prompt at a time), S tokens in a forward, H target hidden, V target
vocabulary, F drafter feature width, K draft tokens per round.

One round, with the committed sequence x_0..x_n (x_n chosen by the target, not yet in its KV
cache):
  1. the drafter proposes d_1..d_k (k <= K) continuing x_0..x_n;
  2. one target forward over [x_n, d_1..d_k]: d_j is accepted while it equals the target's argmax
     at the previous position; the target's argmax after the last accepted token is the bonus
     token. a accepted + 1 bonus tokens are committed per target forward (tau = their mean);
  3. the target's DynamicCache is cropped to the committed tokens, and the drafter is extended
     with d_1..d_a + bonus and the target's features at x_n, d_1..d_a (drafter.py).
The output is compared with plain greedy decoding by the caller (runner.py): any difference
fails the evaluation, so a bug cannot inflate tau.

Speed (what the loop does so that its own overhead does not eat the gain, see
docs/notes/issue-20.md): the verifying forward computes the target's final hidden states for
all k+1 positions; in fp32 it projects them onto the vocabulary one position at a time and stops
at the first rejection (usually after one or two of the k+1 rows: the full-vocabulary head is a
large part of a forward of this size, and an fp32 product costs ~2.4x at 6 rows what it costs at
one), in bf16 all rows in one product (AMX: 6 rows cost ~1.1x one row, 7.6 vs 7.0 ms for
SmolLM2's 576 x 49,152 head on one core); the prefill projects only its last position; the
drafter is not extended after the last round.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from draft_trainer.methods.base import Drafter

# Causal LMs whose logits are exactly lm_head(final hidden state): no soft-capping or scaling.
# Others run the verification through the full forward (all k+1 logits rows).
_PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral"}


@dataclass
class SpecStats:
    rounds: int = 0
    accepted: list[int] = field(default_factory=list)   # accepted draft tokens per round
    proposed: list[int] = field(default_factory=list)   # draft tokens proposed per round (<= K)
    new_tokens: int = 0
    seconds: float = 0.0
    draft_s: float = 0.0                                 # inside the drafter (start/propose/extend)
    target_s: float = 0.0                                # target prefill and verification forwards


def eos_set(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


@functools.lru_cache(maxsize=None)
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def _with_cache(model, cache) -> dict:
    """The KV-cache keyword: `cache` in transformers >= 5.2x, `past_key_values` before."""
    return {"cache" if "cache" in _forward_params(type(model)) else "past_key_values": cache, "use_cache": True}


def _keeps_last_logits(target) -> dict:
    """`logits_to_keep=1` where the model takes it: a prefill then projects one row, not S."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(type(target)) else {}


@torch.inference_mode()
def greedy_decode(target, prompt: list[int], max_new_tokens: int, eos: set[int]) -> tuple[list[int], float]:
    """Plain greedy decoding with a KV cache (as `generate` runs it): the reference output and speed."""
    from transformers import DynamicCache

    t0 = time.perf_counter()
    cache = DynamicCache()
    out = target(torch.tensor([prompt]), **_with_cache(target, cache), **_keeps_last_logits(target))
    toks = []
    nxt = int(out.logits[0, -1].argmax())
    while True:
        toks.append(nxt)
        if len(toks) >= max_new_tokens or nxt in eos:
            break
        out = target(torch.tensor([[nxt]]), **_with_cache(target, cache))
        nxt = int(out.logits[0, -1].argmax())
    return toks, time.perf_counter() - t0


class TargetVerifier:
    """The target's side of speculative decoding: prefill, verification forwards, its KV cache,
    and the features the drafter asked for (outputs of `feature_layers`, concatenated)."""

    def __init__(self, target, feature_layers: Sequence[int], lazy_head: bool = True) -> None:
        self.target = target
        self.layers = tuple(feature_layers)
        n_layers = target.config.num_hidden_layers
        if any(not 0 <= i < n_layers for i in self.layers):
            raise ValueError(f"feature layers {list(self.layers)} do not fit the target's {n_layers} layers")
        plain = getattr(target.config, "model_type", None) in _PLAIN_HEAD_TYPES
        self.body = target.get_decoder() if lazy_head and plain else None
        self.head = target.get_output_embeddings() if self.body is not None else None
        # fp32: row by row, stopping at the first rejection; bf16/fp16: all rows at once (module doc)
        self.rows_at_once = self.head is not None and self.head.weight.dtype != torch.float32
        self.cache = None

    def _forward(self, ids: list[int], prefill: bool):
        """(final hidden states [1,S,H] or None, logits [1,S',V] or None, features [S,F] or None)."""
        want = bool(self.layers)
        x = torch.tensor([ids])
        if self.body is not None:
            out = self.body(x, **_with_cache(self.body, self.cache), output_hidden_states=want)
            last, logits = out.last_hidden_state, None
        else:
            extra = _keeps_last_logits(self.target) if prefill else {}
            out = self.target(x, **_with_cache(self.target, self.cache), output_hidden_states=want, **extra)
            last, logits = None, out.logits
        # hidden_states[0] is the embedding output: layer i's output is hidden_states[i + 1].
        feats_SF = torch.cat([out.hidden_states[i + 1][0] for i in self.layers], dim=-1) if want else None
        return last, logits, feats_SF

    def _argmax_at(self, last, logits, j: int) -> int:
        if logits is not None:
            return int(logits[0, j].argmax())
        j %= last.shape[1]
        return int(self.head(last[:, j : j + 1])[0, 0].argmax())

    def prefill(self, prompt: list[int]) -> tuple[int, torch.Tensor | None]:
        """A new sequence: returns the target's first token and the prompt positions' features."""
        from transformers import DynamicCache

        self.cache = DynamicCache()
        last, logits, feats_SF = self._forward(list(prompt), prefill=True)
        return self._argmax_at(last, logits, -1), feats_SF

    def verify(self, last_token: int, drafts: list[int]) -> tuple[int, int, torch.Tensor | None]:
        """One forward over [last_token, *drafts]: (accepted a, bonus token, features of the a+1
        kept positions). The cache keeps last_token and the accepted drafts."""
        last, logits, feats_SF = self._forward([last_token] + drafts, prefill=False)
        if self.rows_at_once:
            last, logits = None, self.head(last)
        a = 0
        bonus = self._argmax_at(last, logits, 0)
        while a < len(drafts) and drafts[a] == bonus:  # accepted: the target's choice at the previous position
            a += 1
            bonus = self._argmax_at(last, logits, a)
        if a < len(drafts):                             # drop the rejected drafts' entries
            self.cache.crop(-(len(drafts) - a))
        return a, bonus, (feats_SF[: a + 1] if feats_SF is not None else None)


@torch.inference_mode()
def speculative_decode(target, drafter: Drafter, prompt: list[int], num_steps: int, max_new_tokens: int,
                       eos: set[int], *, verifier: TargetVerifier | None = None,
                       min_confidence: float = 0.0) -> tuple[list[int], SpecStats]:
    """Greedy chain speculative decoding of one prompt (module doc); returns (tokens, stats).
    `min_confidence` > 0 lets the drafter end a chain early (dynamic length, Drafter.propose)."""
    verifier = verifier or TargetVerifier(target, drafter.feature_layers)
    st = SpecStats()
    clock = time.perf_counter
    t0 = clock()
    x_n, feats_SF = verifier.prefill(prompt)
    t1 = clock()
    drafter.start(prompt, x_n, feats_SF)
    t2 = clock()
    st.target_s += t1 - t0
    st.draft_s += t2 - t1
    toks = [x_n]
    done = len(toks) >= max_new_tokens or x_n in eos
    while not done:
        t1 = clock()
        # (drafters written before dynamic chains take one argument: pass it only when asked)
        drafts = drafter.propose(num_steps, min_confidence) if min_confidence > 0 else drafter.propose(num_steps)
        t2 = clock()
        if len(drafts) > num_steps:
            raise ValueError(f"drafter {drafter.name} proposed {len(drafts)} tokens, more than {num_steps}")
        a, bonus, feats_SF = verifier.verify(x_n, drafts)
        t3 = clock()
        st.draft_s += t2 - t1
        st.target_s += t3 - t2
        st.rounds += 1
        st.accepted.append(a)
        st.proposed.append(len(drafts))
        new = drafts[:a] + [bonus]
        for t in new:
            toks.append(t)
            if len(toks) >= max_new_tokens or t in eos:
                done = True
                break
        if not done:  # the last round's tokens are never drafted from: skip that extension
            drafter.extend(new, feats_SF)
            st.draft_s += clock() - t3
        x_n = bonus
    st.seconds = clock() - t0
    st.new_tokens = len(toks)
    return toks, st
