"""Collating streamed features and tokenized samples into a padded training batch.

Legend (shapes): B samples, T longest sample in the batch (right padding), H target hidden,
K top-k width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.errors import SchemaError
from common.features import SampleFeatures


@dataclass
class Batch:
    sample_ids: list[int]
    input_ids_BT: torch.Tensor       # token ids (unshifted)
    loss_mask_BT: torch.Tensor       # 1 = supervised token
    attention_mask_BT: torch.Tensor  # 1 = real token
    aux_BT3H: torch.Tensor
    teacher_BTH: torch.Tensor | None = None
    topk_ids_BTK: torch.Tensor | None = None
    topk_logprobs_BTK: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask_BT.sum())

    def to(self, device: torch.device | str) -> "Batch":
        def mv(x):
            return None if x is None else x.to(device, non_blocking=True)

        return Batch(self.sample_ids, mv(self.input_ids_BT), mv(self.loss_mask_BT), mv(self.attention_mask_BT),
                     mv(self.aux_BT3H), mv(self.teacher_BTH), mv(self.topk_ids_BTK), mv(self.topk_logprobs_BTK))


def collate(samples: list[tuple[int, np.ndarray, np.ndarray]], feats: list[SampleFeatures],
            dtype: torch.dtype = torch.float32) -> Batch:
    """Pad to the longest sample; features are copied once, from the wire views into the batch."""
    if len(samples) != len(feats):
        raise SchemaError(f"{len(samples)} samples but {len(feats)} feature sets")
    T = max(len(s[1]) for s in samples)
    B = len(samples)
    H3 = feats[0].aux_T3H.shape[1]
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.float32)
    attn = torch.zeros(B, T, dtype=torch.long)
    aux = torch.zeros(B, T, H3, dtype=dtype)
    teacher = None if feats[0].teacher_TH is None else torch.zeros(B, T, H3 // 3, dtype=dtype)
    K = 0 if feats[0].topk_ids_TK is None else feats[0].topk_ids_TK.shape[1]
    tk_ids = torch.zeros(B, T, K, dtype=torch.int32) if K else None
    tk_lp = torch.full((B, T, K), -1e30, dtype=torch.float32) if K else None
    for b, ((sid, s_ids, s_mask), f) in enumerate(zip(samples, feats)):
        n = len(s_ids)
        if f.sample_id != sid or f.length != n:
            raise SchemaError(f"features for sample {f.sample_id} ({f.length} tokens) do not match sample {sid} "
                              f"({n} tokens)")
        ids[b, :n] = torch.from_numpy(np.asarray(s_ids, dtype=np.int64))
        mask[b, :n] = torch.from_numpy(np.asarray(s_mask, dtype=np.float32))
        attn[b, :n] = 1
        aux[b, :n] = f.aux_T3H
        if teacher is not None:
            teacher[b, :n] = f.teacher_TH
        if K:
            tk_ids[b, :n] = f.topk_ids_TK
            tk_lp[b, :n] = f.topk_logprobs_TK
    return Batch([s[0] for s in samples], ids, mask, attn, aux, teacher, tk_ids, tk_lp)
