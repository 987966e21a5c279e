"""Batched, KV-cached decoding for the HF backend, with rows joining and leaving between steps.

Legend (shapes): B running rows, n rows joining, L cache length (columns, left-padded),
Tn longest joining prompt, V vocab, kvh KV heads, d head dim.

The running batch is one transformers `DynamicCache` whose layers hold [B, kvh, L, d] keys and
values, plus a [B, L] attention mask (0 = padding) and each row's next position. Rows are
left-padded: RoPE is applied with explicit per-row positions before keys are cached, so a
row's absolute column does not matter, only the mask. Joining rows are prefilled as their own
left-padded batch and concatenated (the shorter side padded on the left); leaving rows are
dropped with an index select, and columns that became padding in every row are trimmed.
This is what `generate` does for a left-padded batch, extended to rows that come and go.
"""

from __future__ import annotations

import inspect
import threading

import torch

from target_server.backends.base import Decoder


def _pad_left(x: torch.Tensor, cols: int, dim: int) -> torch.Tensor:
    if cols == 0:
        return x
    shape = list(x.shape)
    shape[dim] = cols
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class HFDecoder(Decoder):
    def __init__(self, model: torch.nn.Module, device: torch.device, lock: threading.Lock) -> None:
        self.model, self.device, self._lock = model, device, lock
        self.cache = None  # DynamicCache of the running rows
        self.mask_BL: torch.Tensor | None = None
        self.pos_B: torch.Tensor | None = None
        # transformers >= 5.2x calls the cache argument `cache` (and warns on the old name).
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @property
    def rows(self) -> int:
        return 0 if self.mask_BL is None else self.mask_BL.shape[0]

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        from transformers import DynamicCache

        n, Tn = len(prompts), max(map(len, prompts))
        ids_nT = torch.zeros(n, Tn, dtype=torch.long)
        mask_nT = torch.zeros(n, Tn, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids_nT[b, Tn - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask_nT[b, Tn - len(p):] = 1
        pos_nT = (mask_nT.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache()
        with self._lock:
            out = self.model(input_ids=ids_nT.to(self.device), attention_mask=mask_nT.to(self.device),
                             position_ids=pos_nT.to(self.device), use_cache=True, logits_to_keep=1,
                             **{self._cache_kw: cache})
        self._join(cache, mask_nT.to(self.device), torch.as_tensor([len(p) for p in prompts], device=self.device))
        return out.logits[:, -1].float().cpu()

    def _join(self, cache, mask_nL: torch.Tensor, pos_n: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.mask_BL, self.pos_B = cache, mask_nL, pos_n
            return
        L, Ln = self.mask_BL.shape[1], mask_nL.shape[1]
        Lm = max(L, Ln)
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, Lm - L, 2), _pad_left(new.keys, Lm - Ln, 2)])
            old.values = torch.cat([_pad_left(old.values, Lm - L, 2), _pad_left(new.values, Lm - Ln, 2)])
        self.mask_BL = torch.cat([_pad_left(self.mask_BL, Lm - L, 1), _pad_left(mask_nL, Lm - Ln, 1)])
        self.pos_B = torch.cat([self.pos_B, pos_n])

    @torch.inference_mode()
    def step(self, tokens: list[int]) -> torch.Tensor:
        B = self.rows
        if len(tokens) != B:
            raise ValueError(f"step: {len(tokens)} tokens for {B} rows")
        ids_B1 = torch.as_tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        mask_BL = torch.cat([self.mask_BL, self.mask_BL.new_ones(B, 1)], dim=1)
        with self._lock:
            out = self.model(input_ids=ids_B1, attention_mask=mask_BL, position_ids=self.pos_B[:, None],
                             use_cache=True, **{self._cache_kw: self.cache})
        self.mask_BL, self.pos_B = mask_BL, self.pos_B + 1
        return out.logits[:, -1].float().cpu()

    def keep(self, rows: list[int]) -> None:
        if len(rows) == self.rows:
            return
        if not rows:
            self.cache = self.mask_BL = self.pos_B = None
            return
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.mask_BL, self.pos_B = self.mask_BL[idx], self.pos_B[idx]
        # Columns that are padding in every remaining row (a long row left): trim them.
        first = int(self.mask_BL.any(dim=0).nonzero()[0])
        for layer in self.cache.layers:
            layer.keys = layer.keys[idx, :, first:]
            layer.values = layer.values[idx, :, first:]
        self.mask_BL = self.mask_BL[:, first:]
