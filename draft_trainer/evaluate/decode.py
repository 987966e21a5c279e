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
Trees (`width` > 1, SGLang's topk > 1 in its simplest shape): beside each chain token d_j the
drafter also proposes up to width - 1 alternatives a_j,i (its next-best tokens at that step), leaves
of the tree that follow d_{j-1}. All are verified in the same forward, each row attending to its
own path only (rowwise_attention.tree_rows): where d_j is rejected but an a_j,i is the target's
choice, it is accepted and the round ends on it (the drafter drafted no further from it), and its
cache entry moves up to follow d_{j-1}. On this CPU a bf16 forward over a few more rows costs
little (issue-20 notes), so a weak draft's second guesses are cheap acceptance.
The output is compared with plain greedy decoding by the caller (runner.py): any difference
fails the evaluation, so a bug cannot inflate tau.

Speed (what the loop does so that its own overhead does not eat the gain, see
docs/notes/issue-20.md): the verifying forward computes the target's final hidden states for
all k+1 positions; in fp32 it projects them onto the vocabulary one position at a time and stops
at the first rejection (usually after one or two of the k+1 rows: the full-vocabulary head is a
large part of a forward of this size, and an fp32 product costs ~2.1-2.9x at 6 rows what it costs at
one, prepacked or not), in bf16 all rows in one product (AMX: 6 rows cost ~1.1x one row, 7.6 vs 7.0 ms for
SmolLM2's 576 x 49,152 head on one core); the prefill projects only its last position; the
drafter is not extended after the last round. An fp32 target's linears are best prepacked
(common/cpu_linear.py; the runner does it): torch's sgemm repacks every weight at each few-row
verification.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from draft_trainer.evaluate import rowwise_attention
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

    def _forward(self, ids: list[int], prefill: bool, depth: list[int] | None = None):
        """(final hidden states [1,S,H] or None, logits [1,S',V] or None, features [S,F] or None).
        `depth`: each row's position after the cache (a tree's rows); default 0..S-1."""
        want = bool(self.layers)
        x = torch.tensor([ids])
        extra = {}
        if depth is not None:
            extra["position_ids"] = torch.tensor([depth]) + self.cache.get_seq_length()
        if self.body is not None:
            out = self.body(x, **_with_cache(self.body, self.cache), output_hidden_states=want, **extra)
            last, logits = out.last_hidden_state, None
        else:
            extra.update(_keeps_last_logits(self.target) if prefill else {})
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

    def verify(self, last_token: int, drafts: list[int],
               alternatives: Sequence[Sequence[int]] = ()) -> tuple[list[int], int, torch.Tensor | None]:
        """One forward over [last_token, *drafts, *alternatives]: (the a accepted tokens, the bonus
        token, features of the a+1 kept positions). The cache keeps last_token and the accepted tokens.
        `alternatives[j]` are other candidates for drafts[j] (a tree, module doc): one of them is
        accepted when drafts[j] is not and it is the target's choice; the round then ends there."""
        alts = [(j, t) for j, ts in enumerate(alternatives[: len(drafts)]) for t in ts]
        ids = [last_token] + drafts + [t for _, t in alts]
        if not alts:
            last, logits, feats_SF = self._forward(ids, prefill=False)
        else:
            if getattr(self.target.config, "_attn_implementation", None) != rowwise_attention.NAME:
                raise ValueError("tree verification needs the target loaded with row-wise attention "
                                 f"(attn_implementation={rowwise_attention.register()!r})")
            kinds = {type(layer).__name__ for layer in self.cache.layers} - {"DynamicLayer"}
            if kinds:   # a sliding-window layer keeps only its window: an accepted alternative could not move up
                raise ValueError(f"tree verification supports full-attention targets; this one's cache has {kinds}")
            # the chain's row j (x_n = 0) is at depth j; an alternative to drafts[j] follows row j
            parents = list(range(-1, len(drafts))) + [j for j, _ in alts]
            depth = list(range(len(drafts) + 1)) + [j + 1 for j, _ in alts]
            with rowwise_attention.tree_rows(parents):
                last, logits, feats_SF = self._forward(ids, prefill=False, depth=depth)
        if self.rows_at_once:
            last, logits = None, self.head(last)
        a = 0
        bonus = self._argmax_at(last, logits, 0)
        while a < len(drafts) and drafts[a] == bonus:  # accepted: the target's choice at the previous position
            a += 1
            bonus = self._argmax_at(last, logits, a)
        kept, accepted = list(range(a + 1)), drafts[:a]
        row = next((len(drafts) + 1 + i for i, (j, t) in enumerate(alts) if j == a and t == bonus), None)
        if row is not None:                             # an alternative is the target's choice: the path ends on it
            kept.append(row)
            accepted.append(bonus)
            bonus = self._argmax_at(last, logits, row)
        if len(kept) < len(ids):                        # drop the rejected rows' cache entries
            self._keep(kept, len(ids))
        return accepted, bonus, (feats_SF[kept] if feats_SF is not None else None)

    def _keep(self, rows: list[int], n_new: int) -> None:
        """Keeps, of the last forward's n_new cache entries, those of `rows`: 0..m-1 and at most one
        accepted alternative, whose entry moves up to follow the chain rows it extends."""
        m = next((i for i, r in enumerate(rows) if r != i), len(rows))
        if m == len(rows):
            self.cache.crop(-(n_new - m))
            return
        for layer in self.cache.layers:
            base = layer.keys.shape[-2] - n_new
            idx = torch.tensor([base + r for r in rows[m:]])
            layer.keys = torch.cat([layer.keys[..., : base + m, :], layer.keys.index_select(-2, idx)], dim=-2)
            layer.values = torch.cat([layer.values[..., : base + m, :], layer.values.index_select(-2, idx)], dim=-2)


@torch.inference_mode()
def speculative_decode(target, drafter: Drafter, prompt: list[int], num_steps: int, max_new_tokens: int,
                       eos: set[int], *, verifier: TargetVerifier | None = None,
                       min_confidence: float = 0.0, width: int = 1) -> tuple[list[int], SpecStats]:
    """Greedy speculative decoding of one prompt (module doc); returns (tokens, stats).
    `min_confidence` > 0 lets the drafter end a chain early (dynamic length, Drafter.propose);
    `width` > 1 verifies up to width - 1 alternatives beside each chain token (a tree, module doc)."""
    if width > 1 and not hasattr(drafter, "propose_tree"):
        raise ValueError(f"drafter {drafter.name} proposes chains only: decode it with width 1")
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
        alts: list[list[int]] = []
        if width > 1:
            drafts, alts = drafter.propose_tree(num_steps, width, min_confidence)
        else:   # (drafters written before dynamic chains take one argument: pass it only when asked)
            drafts = drafter.propose(num_steps, min_confidence) if min_confidence > 0 else drafter.propose(num_steps)
        t2 = clock()
        if len(drafts) > num_steps:
            raise ValueError(f"drafter {drafter.name} proposed {len(drafts)} tokens, more than {num_steps}")
        if any(len(ts) >= width for ts in alts):
            raise ValueError(f"drafter {drafter.name} proposed {[len(ts) for ts in alts]} alternatives per "
                             f"position, more than {width - 1}")
        accepted, bonus, feats_SF = verifier.verify(x_n, drafts, alts)
        a = len(accepted)
        t3 = clock()
        st.draft_s += t2 - t1
        st.target_s += t3 - t2
        st.rounds += 1
        st.accepted.append(a)
        st.proposed.append(len(drafts) + sum(len(ts) for ts in alts))
        new = accepted + [bonus]
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
