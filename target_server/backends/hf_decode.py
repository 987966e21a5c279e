"""Batched, KV-cached decoding for the HF backend, with rows joining and leaving between steps.

Legend (shapes): B running rows, R row capacity, C column capacity, L columns attended this step
(longest row + 1), n joining rows, g rows of one prefill group, Tg its longest prompt, V vocab,
kvh KV heads, d head dim.

Every layer keeps preallocated keys and values [R, kvh, C, d], written in place. A row's tokens
sit left-aligned in its slot (columns [0, len)), so a decode step writes each row's new key and
value at its own column `len` (one indexed write per layer) and attends over the view
[:B, :, :L] under a [B, 1, 1, L] mask (column <= len) built once per step. The earlier decoder
kept a transformers `DynamicCache`, which grows by `torch.cat` every step: it copied the whole
KV of the batch on every step (73% of a step at B=32 with ~700-token rows, see
docs/notes/issue-17.md), and joining rows padded and concatenated all of it again.

Rows fill slots 0..B-1 densely. The caller's row order (row b = the b-th added and kept) maps to
slots through `slots`, so a row leaving costs one row copy (a slot past the end moves into the
hole), not a copy of the batch. Joining prompts are prefilled in length-sorted groups (little
padding) through a temporary `DynamicCache`, whose real (unpadded) columns are copied once into
their slots. Capacity grows by a quarter at least, so the cache is copied O(log) times over a
run, not every step; it is released when the batch empties. A growth in one dimension sizes the
other to what the rows use now: a long row that has left does not leave its columns to every
later row. Every slot spans all columns, so the scheduler bounds rows x the longest row's
reservation (`Decoder.padded_rows`), and a growth leaves the capacity within a quarter (and a
quantum) of the running rows' need in each dimension.

Memory: growing replaces one layer's tensor at a time (the old one freed before the next is
allocated), so a growth holds the cache once plus one layer, not the old and the new cache side
by side (2.25x at +25%: 4.7 GB peaks in the demo's regeneration servers, docs/notes/issue-20.md).
Storage is allocated uninitialised and zeroed only up to the columns attended so far (`_clean`),
so the pages of a capacity's unused tail are never touched (never resident).
"""

from __future__ import annotations

import inspect
import threading

import torch

from target_server.backends.base import Decoder

PREFILL_MAX_PAD = 1.25       # a prefill group's padded tokens / its real tokens, at most
PREFILL_MAX_TOKENS = 16384   # padded tokens of one prefill group (bounds its activations)
MASKS = {"sdpa": "bool", "eager": "additive"}  # attention implementations this decoder builds masks for


def prefill_groups(lengths: list[int], max_pad: float = PREFILL_MAX_PAD,
                   max_tokens: int = PREFILL_MAX_TOKENS) -> list[list[int]]:
    """Indices of `lengths` in groups of similar length (ascending), each padded to its longest
    within `max_pad` x its real tokens and `max_tokens` in all (a single prompt is always a group)."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        g = groups[-1] if groups else None
        if g and lengths[i] * (len(g) + 1) <= min(max_pad * (real + lengths[i]), max_tokens):
            g.append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


def _grown(need: int, have: int, quantum: int) -> int:
    """A capacity >= need, at least a quarter above the old one, rounded up to `quantum`."""
    want = max(need, have + have // 4)
    return -(-want // quantum) * quantum


def _fitted(need: int, have: int, quantum: int) -> int:
    """`have` cut down to `need` and a quarter spare, rounded up to `quantum` (never above `have`)."""
    return min(have, -(-(need + need // 4) // quantum) * quantum)


def _cache_class():
    from transformers import Cache

    class SlotCache(Cache):
        """What the model sees during a decode step: `update` writes the step's keys and values
        in place and returns views of the running rows (nothing is concatenated)."""

        def __init__(self, decoder: "HFDecoder") -> None:
            try:
                super().__init__(layers=[])
            except TypeError:  # an older Cache signature: the model only calls update() on it anyway
                self.layers = []
            self.decoder = decoder

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return self.decoder._write(layer_idx, key_states, value_states)

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.decoder._L - 1

    return SlotCache


def supports(model: torch.nn.Module) -> bool:
    """Whether HFDecoder can batch this model: full attention in every layer (sliding-window /
    hybrid layers keep another cache layout) and an attention implementation it builds masks for."""
    kinds = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    return kinds == {"full_attention"} and _attn_implementation(model) in MASKS


def _attn_implementation(model: torch.nn.Module) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


class HFDecoder(Decoder):
    padded_rows = True  # every slot spans the capacity's columns

    def __init__(self, model: torch.nn.Module, device: torch.device, lock: threading.Lock,
                 rows: int = 8, cols: int = 256) -> None:
        self.model, self.device, self._lock = model, device, lock
        if not supports(model):
            raise ValueError(f"HFDecoder needs full attention in every layer and one of {sorted(MASKS)} "
                             f"attention implementations (this model: {_attn_implementation(model)!r})")
        self._mask_kind = MASKS[_attn_implementation(model)]
        self._min_rows, self._min_cols = rows, cols
        self.keys: list[torch.Tensor] = []    # per layer [R, kvh, C, d]
        self.values: list[torch.Tensor] = []  # per layer [R, kvh, C, d]
        self.len_R = torch.zeros(0, dtype=torch.long, device=device)  # tokens cached per slot
        self.slots: list[int] = []            # row b -> its slot
        self.grown = 0                        # capacity changes so far (tests, metrics)
        self._clean = 0                       # columns [0, _clean) hold finite values in every slot
        self._L = 0                           # columns attended by the step in progress
        self._slot_cache = _cache_class()(self)
        # transformers >= 5.2x calls the cache argument `cache` (and warns on the old name).
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @property
    def rows(self) -> int:
        return len(self.slots)

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, columns) allocated."""
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    @property
    def kv_bytes(self) -> int:
        """Bytes of storage written so far: every slot's columns [0, _clean) (the tail is never touched)."""
        return sum(t.shape[0] * t.shape[1] * self._clean * t.shape[3] * t.element_size()
                   for t in (*self.keys, *self.values))

    # ---------------------------------------------------------------- storage
    def _ensure(self, rows: int, cols: int, like: list[torch.Tensor] | None = None) -> None:
        """Room for `rows` slots of `cols` columns, columns [0, cols) finite in every slot; `like`
        (per-layer [*, kvh, *, d]) gives the layout on first use. Growing copies the live part once,
        and sizes the other dimension to what the rows use now (a quarter spare): capacity follows the
        batch's shape (many short rows after a long one) instead of ratcheting in both dimensions."""
        R, C = self.capacity
        if rows > R or cols > C:
            B, live = self.rows, (int(self.len_R[: self.rows].max()) if self.rows else 0)
            need_r, need_c = max(rows, self._min_rows), max(cols, live, self._min_cols)
            R2 = _grown(need_r, R, 8) if rows > R else _fitted(need_r, R, 8)
            C2 = _grown(need_c, C, 64) if cols > C else _fitted(need_c, C, 64)
            # What is zeroed now is resident from now on: the columns in use, not the old high-water mark.
            clean = min(self._clean, C2, -(-need_c // 64) * 64)
            fresh = not self.keys
            stores = [list(like), list(like)] if fresh else [self.keys, self.values]
            for store in stores:
                for li, old in enumerate(store):
                    new = self._alloc((R2, old.shape[1], C2, old.shape[3]), old.dtype)
                    new[B:, :, :clean].zero_()
                    new[:B, :, live:clean].zero_()
                    if not fresh:
                        new[:B, :, :live] = old[:B, :, :live]
                    store[li] = new  # the old tensor goes now, before the next layer's is allocated
            self.keys, self.values = stores
            self._clean = clean
            len_R = torch.zeros(R2, dtype=torch.long, device=self.device)
            len_R[:B] = self.len_R[:B]
            self.len_R = len_R
            self.grown += 1
        if cols > self._clean:
            # Masked columns still enter the attention kernel (weight 0 x value) and uninitialised
            # memory may hold NaN: zero what is about to be attended, a 64-column chunk at a time.
            C = self.capacity[1]
            upto = min(C, -(-cols // 64) * 64)
            for t in (*self.keys, *self.values):
                t[:, :, self._clean: upto].zero_()
            self._clean = upto

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Uninitialised storage (its pages are touched, hence resident, only where written)."""
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _write(self, layer: int, k_Bh1d: torch.Tensor, v_Bh1d: torch.Tensor):
        """One decode step's keys/values for `layer`, written at each row's next column."""
        B = k_Bh1d.shape[0]
        K, V = self.keys[layer], self.values[layer]
        K[self._ar_B, :, self._len_B] = k_Bh1d[:, :, 0]
        V[self._ar_B, :, self._len_B] = v_Bh1d[:, :, 0]
        return K[:B, :, : self._L], V[:B, :, : self._L]

    # ---------------------------------------------------------------- Decoder
    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        from transformers import DynamicCache

        lengths = [len(p) for p in prompts]
        B, n = self.rows, len(prompts)
        logits_nV: torch.Tensor | None = None
        for group in prefill_groups(lengths):
            g, Tg = len(group), max(lengths[i] for i in group)
            ids_gT = torch.zeros(g, Tg, dtype=torch.long)
            mask_gT = torch.zeros(g, Tg, dtype=torch.long)
            for j, i in enumerate(group):
                ids_gT[j, Tg - lengths[i]:] = torch.as_tensor(prompts[i], dtype=torch.long)
                mask_gT[j, Tg - lengths[i]:] = 1
            pos_gT = (mask_gT.cumsum(1) - 1).clamp(min=0)
            cache = DynamicCache()
            with self._lock:
                out = self.model(input_ids=ids_gT.to(self.device), attention_mask=mask_gT.to(self.device),
                                 position_ids=pos_gT.to(self.device), use_cache=True, logits_to_keep=1,
                                 **{self._cache_kw: cache})
            layers = cache.layers
            self._ensure(B + n, max(lengths) + 1, like=[layer.keys for layer in layers])
            # Copy each row's real columns (its left padding dropped) into its slot.
            for li, layer in enumerate(layers):
                K, V = self.keys[li], self.values[li]
                for j, i in enumerate(group):
                    T = lengths[i]
                    K[B + i, :, :T] = layer.keys[j, :, Tg - T:]
                    V[B + i, :, :T] = layer.values[j, :, Tg - T:]
            last_gV = out.logits[:, -1].float().cpu()
            if logits_nV is None:
                logits_nV = last_gV.new_empty(n, last_gV.shape[-1])
            logits_nV[group] = last_gV
        self.len_R[B: B + n] = torch.as_tensor(lengths, dtype=torch.long, device=self.device)
        self.slots += range(B, B + n)
        return logits_nV

    @torch.inference_mode()
    def step(self, tokens: list[int]) -> torch.Tensor:
        B = self.rows
        if len(tokens) != B:
            raise ValueError(f"step: {len(tokens)} tokens for {B} rows")
        slot_B = torch.as_tensor(self.slots, dtype=torch.long, device=self.device)
        ids_B1 = torch.empty(B, 1, dtype=torch.long, device=self.device)
        ids_B1[slot_B, 0] = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        len_B = self.len_R[:B]
        self._L = int(len_B.max()) + 1
        self._ensure(B, self._L)
        len_B = self.len_R[:B]  # (a new tensor if it grew)
        self._ar_B, self._len_B = torch.arange(B, device=self.device), len_B
        ok_B11L = (torch.arange(self._L, device=self.device) <= len_B[:, None])[:, None, None, :]
        if self._mask_kind == "additive":
            ok_B11L = torch.zeros(ok_B11L.shape, dtype=self.keys[0].dtype, device=self.device).masked_fill(
                ~ok_B11L, torch.finfo(self.keys[0].dtype).min)
        with self._lock:
            out = self.model(input_ids=ids_B1, attention_mask=ok_B11L, position_ids=len_B[:, None],
                             use_cache=True, **{self._cache_kw: self._slot_cache})
        len_B += 1
        return out.logits[:, -1][slot_B].float().cpu()

    @torch.inference_mode()  # the storage is made of inference tensors: in-place moves need the mode
    def keep(self, rows: list[int]) -> None:
        if len(rows) == self.rows:
            return
        if not rows:
            self.keys, self.values, self.slots, self._clean = [], [], [], 0
            self.len_R = torch.zeros(0, dtype=torch.long, device=self.device)
            return
        slots = [self.slots[r] for r in rows]
        nb = len(slots)
        # Slots past the new end move into the holes below it: one row copy per leaving row at most.
        holes = sorted(set(range(nb)) - set(slots))
        movers = [b for b, s in enumerate(slots) if s >= nb]
        for hole, b in zip(holes, movers):
            src = slots[b]
            T = int(self.len_R[src])
            for K, V in zip(self.keys, self.values):
                K[hole, :, :T] = K[src, :, :T]
                V[hole, :, :T] = V[src, :, :T]
            self.len_R[hole] = self.len_R[src]
            slots[b] = hole
        self.slots = slots
