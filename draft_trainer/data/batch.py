"""Collating streamed features and tokenized samples into a padded training batch.

Legend (shapes): B samples, T longest sample in the batch (right padding), H target hidden,
K top-k width, W a float feature's row width (3H for aux, H for teacher), G its fp8 scale groups.

Features are copied once, from the wire views into the padded batch. Features that came as fp8
(`Fp8Rows`: e4m3 bytes + scales, kept as they arrived) are upcast in that same copy: on CPU
straight into the padded float tensor; for an accelerator, the padded bytes and scales (a quarter
of fp32's bytes) are what crosses to the device, and the upcast runs there
(`fp8_upcast_on_device` decides, nowhere else).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.errors import SchemaError
from common.features import SampleFeatures
from common.fp8 import Fp8Rows


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


def fp8_upcast_on_device(device: torch.device) -> bool:
    """Where fp8 features become floats: on the device the batch goes to, unless that is the CPU
    (then in the copy that builds the batch: no second pass, no fp32 copy to move)."""
    return device.type != "cpu"


class PaddedRows:
    """One padded [B, T, W] float tensor of a batch, filled sample by sample.

    Plain: a zero tensor of `dtype`; tensors are cast-copied in, Fp8Rows upcast in (one pass).
    Fp8 to a device (`fp8=True`, every sample's rows Fp8Rows): zero bytes [B*T, W] and unit scales
    [B*T, G] on the host (pinned for CUDA), copied in as they are; `build` moves them and upcasts on
    the device (zero bytes decode to +0.0, as the plain padding). Not run on CUDA here: tested on CPU.
    """

    def __init__(self, B: int, T: int, first, dtype: torch.dtype, fp8: bool, pin: bool = False) -> None:
        self.B, self.T, self.W, self.dtype, self.fp8 = B, T, first.shape[1], dtype, fp8
        if fp8:
            self.served = first.dtype
            self.q_MW = torch.zeros(B * T, self.W, dtype=torch.uint8, pin_memory=pin)   # M = B*T
            self.scale_MG = torch.ones(B * T, first.scale_NG.shape[1], dtype=torch.float32, pin_memory=pin)
        else:
            self.x_BTW = torch.zeros(B, T, self.W, dtype=dtype)

    def put(self, b: int, x: torch.Tensor | Fp8Rows) -> None:
        n = x.shape[0]
        if self.fp8:
            self.q_MW[b * self.T : b * self.T + n] = x.q_NW
            self.scale_MG[b * self.T : b * self.T + n] = x.scale_NG
        elif isinstance(x, Fp8Rows):
            x.upcast(out=self.x_BTW[b, :n])
        else:
            self.x_BTW[b, :n] = x

    def build(self, device: torch.device) -> torch.Tensor:
        if not self.fp8:
            return self.x_BTW if device.type == "cpu" else self.x_BTW.to(device, non_blocking=True)
        rows = Fp8Rows(self.q_MW, self.scale_MG, self.served).to(device, non_blocking=True)
        out = torch.empty(self.B * self.T, self.W, dtype=self.dtype, device=device)
        return rows.upcast(out=out).view(self.B, self.T, self.W)


def _padded(B: int, T: int, xs: list, dtype: torch.dtype, device: torch.device) -> PaddedRows | None:
    if xs[0] is None:
        return None
    fp8 = fp8_upcast_on_device(device) and all(isinstance(x, Fp8Rows) for x in xs)
    return PaddedRows(B, T, xs[0], dtype, fp8, pin=fp8 and device.type == "cuda")


def collate(samples: list[tuple[int, np.ndarray, np.ndarray]], feats: list[SampleFeatures],
            dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Batch:
    """Pad to the longest sample, on `device`; features are copied once, from the wire views into
    the batch (fp8 rows upcast in that copy, or on the device: module docstring)."""
    if len(samples) != len(feats):
        raise SchemaError(f"{len(samples)} samples but {len(feats)} feature sets")
    device = torch.device(device)
    T = max(len(s[1]) for s in samples)
    B = len(samples)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.float32)
    attn = torch.zeros(B, T, dtype=torch.long)
    aux = _padded(B, T, [f.aux_T3H for f in feats], dtype, device)
    teacher = _padded(B, T, [f.teacher_TH for f in feats], dtype, device)
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
        aux.put(b, f.aux_T3H)
        if teacher is not None:
            teacher.put(b, f.teacher_TH)
        if K:
            tk_ids[b, :n] = f.topk_ids_TK
            tk_lp[b, :n] = f.topk_logprobs_TK
    batch = Batch([s[0] for s in samples], ids, mask, attn, aux.build(device),
                  None if teacher is None else teacher.build(device), tk_ids, tk_lp)
    return batch if device.type == "cpu" else batch.to(device)
