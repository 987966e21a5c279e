"""The draft vocabulary: which Vd of the V target tokens the draft can emit.

`used` = the Vd most frequent target ids at supervised positions (padded with unseen ids when
fewer were seen), sorted ascending. SGLang's format stores it as two buffers:
  d2t[i] = used[i] - i   (int64 [Vd]; SGLang rebuilds hot_token_id = d2t + arange(Vd))
  t2d[j] = j in used     (bool [V])
The mapping is pinned per run (saved with every checkpoint, checked on resume and export):
a missing or different mapping silently collapses acceptance in serving. Which mapping a run
trains with is chosen in one place, `choose_vocab`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common.errors import ConfigError, ContractError, DataError, ExportError

log = logging.getLogger(__name__)

DEFAULT_DRAFT_VOCAB_SIZE = 32000   # prepare-data's default, and the trainer's when a dataset pins none


@dataclass
class VocabMapping:
    used: torch.Tensor  # int64 [Vd], ascending target ids
    vocab_size: int     # V
    coverage: float = 1.0  # fraction of supervised tokens inside the draft vocab

    @property
    def draft_vocab_size(self) -> int:
        return int(self.used.numel())

    @property
    def d2t(self) -> torch.Tensor:
        return self.used - torch.arange(self.draft_vocab_size, dtype=torch.long)

    @property
    def t2d(self) -> torch.Tensor:
        t2d = torch.zeros(self.vocab_size, dtype=torch.bool)
        t2d[self.used] = True
        return t2d

    @property
    def target_to_draft(self) -> torch.Tensor:
        """int64 [V]: draft id of each target id (0 where not in the draft vocab; mask with t2d)."""
        out = torch.zeros(self.vocab_size, dtype=torch.long)
        out[self.used] = torch.arange(self.draft_vocab_size, dtype=torch.long)
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256(self.used.numpy().astype(np.int64).tobytes()
                              + str(self.vocab_size).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"vocab_size": self.vocab_size, "coverage": self.coverage, "fingerprint": self.fingerprint(),
                "used": self.used.tolist()}

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "VocabMapping":
        try:
            d = json.loads(Path(path).read_text())
            m = cls(used=torch.tensor(d["used"], dtype=torch.long), vocab_size=int(d["vocab_size"]),
                    coverage=float(d.get("coverage", 1.0)))
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"cannot read the draft vocabulary {path}: {e}") from None
        if d.get("fingerprint") and d["fingerprint"] != m.fingerprint():
            raise DataError(f"draft vocabulary {path} is corrupt (fingerprint mismatch)")
        return m

    @classmethod
    def from_buffers(cls, d2t: torch.Tensor, t2d: torch.Tensor) -> "VocabMapping":
        """Rebuild from d2t/t2d and check they describe the same, valid mapping."""
        Vd, V = d2t.numel(), t2d.numel()
        used = d2t.long() + torch.arange(Vd)
        if used.min() < 0 or used.max() >= V:
            raise ExportError(f"d2t maps draft ids outside the target vocabulary [0, {V})")
        if not bool((used[1:] > used[:-1]).all()):
            raise ExportError("d2t does not map to strictly increasing target ids (corrupt or not a SpecRelay mapping)")
        if int(t2d.sum()) != Vd or not bool(t2d[used].all()):
            raise ExportError(f"t2d marks {int(t2d.sum())} target ids but d2t maps {Vd}, or they disagree")
        return cls(used=used, vocab_size=V)


def build_vocab_mapping(counts_V: torch.Tensor | np.ndarray, draft_vocab_size: int) -> VocabMapping:
    """Top-`draft_vocab_size` ids by count (ties broken by lower id), padded with unseen ids."""
    counts = torch.as_tensor(np.asarray(counts_V), dtype=torch.long)
    V = counts.numel()
    if not 0 < draft_vocab_size <= V:
        raise DataError(f"draft vocab size {draft_vocab_size} must be in 1..{V} (the target vocabulary)")
    # Stable sort by descending count keeps the lower id first among ties: deterministic.
    order = torch.sort(-counts, stable=True).indices
    used = torch.sort(order[:draft_vocab_size]).values
    total = int(counts.sum())
    coverage = float(counts[used].sum()) / total if total else 0.0
    return VocabMapping(used=used, vocab_size=V, coverage=coverage)


def choose_vocab(requested: int, pinned: Path | None, vocab_size: int, counts_V: Callable[[], np.ndarray], *,
                 pinned_by_user: bool = False) -> VocabMapping:
    """The draft vocabulary a run trains with (`data.draft_vocab_size`, `data.vocab_path`).

    requested 0: the pinned one (a dataset's vocab.json, written by prepare-data --draft-vocab-size), else
    the DEFAULT_DRAFT_VOCAB_SIZE most frequent supervised tokens. requested N: N tokens (capped at V) -- the
    pinned vocabulary when it has that size, else the N most frequent of `counts_V()` (the training split),
    so that an asked-for size is never silently replaced by the dataset's. A file the user named
    (`pinned_by_user`) must exist and, with an N, have that size.
    """
    want = min(requested, vocab_size) if requested else 0
    if pinned is not None and (pinned_by_user or pinned.is_file()):
        m = VocabMapping.load(pinned)
        if m.vocab_size != vocab_size:
            raise ContractError(f"pinned draft vocabulary {pinned} is for V={m.vocab_size}, target has V={vocab_size}")
        if not want or m.draft_vocab_size == want:
            return m
        if pinned_by_user:
            raise ConfigError(f"data.vocab_path={pinned} holds {m.draft_vocab_size} tokens but data.draft_vocab_size="
                              f"{requested}; set data.draft_vocab_size=0 (the file's size) or drop data.vocab_path")
        log.info("data.draft_vocab_size=%d: the dataset pins %d tokens (%s); using the %d most frequent of the "
                 "training split instead (data.draft_vocab_size=0 keeps the dataset's)", requested,
                 m.draft_vocab_size, pinned, want)
    return build_vocab_mapping(counts_V(), want or min(DEFAULT_DRAFT_VOCAB_SIZE, vocab_size))


def count_supervised_tokens(input_ids: list[list[int]] | list[np.ndarray], loss_masks, vocab_size: int) -> np.ndarray:
    """Token counts at supervised positions (the ids the draft will be asked to predict)."""
    sel = [np.asarray(ids)[np.asarray(mask).astype(bool)] for ids, mask in zip(input_ids, loss_masks)]
    sel = np.concatenate(sel).astype(np.int64) if sel else np.zeros(0, dtype=np.int64)
    if sel.size and (sel.max() >= vocab_size or sel.min() < 0):
        bad = int(sel.max()) if sel.max() >= vocab_size else int(sel.min())
        raise DataError(f"token id {bad} outside the vocabulary of size {vocab_size}")
    return np.bincount(sel, minlength=vocab_size).astype(np.int64)


def check_same_vocab(a: VocabMapping, b: VocabMapping, a_name: str, b_name: str, error=None) -> None:
    """Raise `error` (default ExportError) unless `a` and `b` map the same draft vocabulary: a
    different mapping silently collapses acceptance."""
    if a.vocab_size != b.vocab_size or not torch.equal(a.used, b.used):
        from common.errors import ExportError

        raise (error or ExportError)(
            f"draft vocabulary mismatch: {a_name} (fingerprint {a.fingerprint()}, V={a.vocab_size}, "
            f"Vd={a.draft_vocab_size}) differs from {b_name} (fingerprint {b.fingerprint()}, V={b.vocab_size}, "
            f"Vd={b.draft_vocab_size}); a draft must be used with the exact mapping it was trained with"
        )
