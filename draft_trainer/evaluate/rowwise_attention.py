"""Row-wise attention for the target in the evaluator: a K+1-token verification computes every
position exactly as a 1-token greedy step would, so bf16 speculative decoding is bit-exact
against bf16 greedy decoding.

Why: with bf16 weights a verification forward over [x_n, d_1..d_k] and k+1 one-token greedy steps
give different logits (up to ~0.5 on SmolLM2-135M) and near-ties flip, so the output could differ
from greedy for reasons other than a bug. On this CPU the linear layers, norms, rotary embedding
and MLP are row-invariant (a row's result does not depend on how many rows share the call;
`tests/unit/test_rowwise_attention.py` checks it where it matters); attention is not: SDPA's
kernel reduces a query row over a masked tail of keys in a different order than over exactly
its own prefix. Here each query row i at absolute position p = L - S + i attends through its own
SDPA call to keys [0, p] (or the last `sliding_window` of them), with no mask: the call a 1-token
greedy step at position p makes. The prefill (S == L, an empty cache) uses transformers' SDPA
path unchanged; greedy and speculative decoding share it.

Trees (decode.py's chain with alternatives): inside `tree_rows(parents)` the S new rows are tree
nodes, row i following row parents[i] (-1: the cache) rather than row i - 1; row i then attends
to the cache, its ancestors' keys in depth order and its own key: again exactly the keys, in the
order, that a 1-token greedy step at its position sees once the path to it is committed.

Cost: one small SDPA call per verified row and layer (S calls instead of one); see
docs/notes/issue-20.md ("Session 7"). For B = 1 without padding (the evaluator's case): a padded
batch would need the mask transformers does not build for a custom attention.

Legend (shapes): B batch (1), n query heads, g key/value heads, S query positions, L key
positions (cache + new), d head dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

NAME = "specrelay_rowwise"

# Per new row: (number of leading rows 0..m-1 on its path, the other rows on it in depth order).
_TREE: contextvars.ContextVar[list[tuple[int, list[int]]] | None] = contextvars.ContextVar("tree", default=None)


def tree_paths(parents: Sequence[int]) -> list[tuple[int, list[int]]]:
    """For each row the rows its attention reads (ancestors and itself), as (m, rest): rows 0..m-1
    (a slice of the keys) then `rest` (gathered)."""
    out = []
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"tree row {i} follows row {p}: a row follows an earlier row or the cache (-1)")
        path = [i]
        while path[-1] >= 0 and parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        path.reverse()
        m = 0
        while m < len(path) and path[m] == m:
            m += 1
        out.append((m, path[m:]))
    return out


@contextlib.contextmanager
def tree_rows(parents: Sequence[int]):
    """Within the block, a forward's new rows form the tree `parents` (module doc)."""
    token = _TREE.set(tree_paths(parents))
    try:
        yield
    finally:
        _TREE.reset(token)


def rowwise_attention(module, query_BnSd: torch.Tensor, key_BgLd: torch.Tensor, value_BgLd: torch.Tensor,
                      attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention-interface signature; returns ([B, S, n, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for unsupported in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"row-wise attention (bf16 evaluation) does not support the target's {unsupported}; "
                             "evaluate this target with --dtype fp32")
    B, _, S, _ = query_BnSd.shape
    L = key_BgLd.shape[2]
    window = kwargs.get("sliding_window")
    if B != 1 or attention_mask is not None:
        raise ValueError(f"row-wise attention evaluates one unpadded sequence at a time (batch {B}, "
                         f"mask {'given' if attention_mask is not None else 'none'})")
    if S == L and (window is None or L <= window):   # a prefill from an empty cache: plain causal SDPA
        return sdpa_attention_forward(module, query_BnSd, key_BgLd, value_BgLd, None, dropout=dropout,
                                      scaling=scaling, is_causal=True)
    if S == L:   # a prefill longer than the sliding window: its causal + window mask, built once
        q_S1, k_1L = torch.arange(S)[:, None], torch.arange(L)[None, :]
        mask_SL = (k_1L <= q_S1) & (k_1L > q_S1 - window)
        out_BnSd = F.scaled_dot_product_attention(query_BnSd, key_BgLd, value_BgLd, attn_mask=mask_SL,
                                                  scale=scaling, enable_gqa=True)
        return out_BnSd.transpose(1, 2).contiguous(), None
    tree = _TREE.get()
    if tree is not None and len(tree) != S:
        raise ValueError(f"tree of {len(tree)} rows given for a forward of {S} new positions")
    base = L - S
    q_rows = query_BnSd.split(1, dim=2)   # every row's query in one op (this loop runs per layer)
    rows = []
    borrowed = None   # (slot, its own key, its own value) while leaves' keys stand in at that slot
    try:
        for i in range(S):
            m, rest = tree[i] if tree is not None else (i + 1, [])
            end = base + m
            start = max(0, end + len(rest) - window) if window is not None else 0   # the last `window` keys
            leaf = len(rest) == 1 and end < L
            if borrowed is not None and not (leaf and borrowed[0] == end):
                _give_back(key_BgLd, value_BgLd, borrowed)   # other rows read that slot's own entry
                borrowed = None
            if leaf:
                # a leaf off the contiguous rows (decode.py's alternatives): its key and value stand in
                # for those at slot `end` for its one call, so that the keys stay a slice (no copy);
                # consecutive leaves at one slot (a position's alternatives) save and restore it once
                slot = _index(end)
                if borrowed is None:
                    borrowed = (end, key_BgLd.index_select(2, slot), value_BgLd.index_select(2, slot))
                src = _index(base + rest[0])
                key_BgLd.index_copy_(2, slot, key_BgLd.index_select(2, src))
                value_BgLd.index_copy_(2, slot, value_BgLd.index_select(2, src))
                rows.append(F.scaled_dot_product_attention(q_rows[i], key_BgLd[:, :, start : end + 1],
                                                           value_BgLd[:, :, start : end + 1],
                                                           scale=scaling, enable_gqa=True))
                continue
            k_BgLd, v_BgLd = key_BgLd[:, :, start:end], value_BgLd[:, :, start:end]
            if rest:   # a deeper branch: its own ancestors' keys appended (a copy)
                idx = torch.tensor([base + r for r in rest])
                k_BgLd = torch.cat([k_BgLd, key_BgLd.index_select(2, idx)], dim=2)
                v_BgLd = torch.cat([v_BgLd, value_BgLd.index_select(2, idx)], dim=2)
                if window is not None:
                    k_BgLd, v_BgLd = k_BgLd[:, :, -window:], v_BgLd[:, :, -window:]
            rows.append(F.scaled_dot_product_attention(q_rows[i], k_BgLd, v_BgLd, scale=scaling, enable_gqa=True))
    finally:
        if borrowed is not None:
            _give_back(key_BgLd, value_BgLd, borrowed)
    out_BnSd = rows[0] if S == 1 else torch.cat(rows, dim=2)
    return out_BnSd.transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=8192)
def _index(i: int) -> torch.Tensor:
    """A one-element index tensor, made once per position (the leaf path runs per row and layer)."""
    return torch.tensor([i])


def _give_back(key_BgLd: torch.Tensor, value_BgLd: torch.Tensor, borrowed) -> None:
    slot, k_Bg1d, v_Bg1d = borrowed
    key_BgLd.index_copy_(2, _index(slot), k_Bg1d)
    value_BgLd.index_copy_(2, _index(slot), v_Bg1d)


def register() -> str:
    """Registers the attention with transformers (idempotent); returns its `attn_implementation` name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, rowwise_attention)
    return NAME
