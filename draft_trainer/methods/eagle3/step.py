"""One EAGLE-3 training step: the step-0 teacher, the TTT forward and the loss.

Legend (shapes): B batch, T sequence length, H target hidden, V target vocab, Vd draft vocab,
K TTT steps.

This is the one place that chooses between the fused path (fused TTT attention + chunked loss,
bf16 matmuls where supported) and the readable reference (`impl="reference"`, fp32), which the
equivalence tests run side by side.
"""

from __future__ import annotations

import torch

from common.errors import ConfigError
from draft_trainer.methods.eagle3.fused_loss import fused_ttt_loss, row_teacher_from_hidden, row_teacher_from_topk
from draft_trainer.methods.eagle3.losses import teacher_from_hidden, teacher_from_topk, ttt_loss
from draft_trainer.methods.eagle3.model import Eagle3Draft
from draft_trainer.model.memory import release_free_heap
from draft_trainer.model.objective import KL, Objective
from draft_trainer.model.precision import autocast, compute_dtype
from draft_trainer.model.stats import StepStats
from draft_trainer.model.tensors import shift_left
from draft_trainer.data.batch import Batch


def make_teacher(batch: Batch, target_head_VH: torch.Tensor | None, used_Vd: torch.Tensor, t2d_V: torch.Tensor,
                 t2d_index_V: torch.Tensor, *, precision: str = "auto", impl: str = "fused"):
    """The step-0 teacher of a batch (no grad): rows for the fused path, dense/sparse for the reference."""
    if impl == "reference":
        if batch.teacher_BTH is not None:
            return teacher_from_hidden(batch.teacher_BTH, target_head_VH, used_Vd, t2d_V, batch.loss_mask_BT)
        return teacher_from_topk(batch.topk_ids_BTK, batch.topk_logprobs_BTK, t2d_V, t2d_index_V, batch.loss_mask_BT)
    if impl != "fused":
        raise ConfigError(f"train_step impl {impl!r}: use 'fused' or 'reference'")
    if batch.teacher_BTH is not None:
        cdt = compute_dtype(precision, batch.aux_BT3H.device)
        return row_teacher_from_hidden(batch.teacher_BTH, target_head_VH, used_Vd, t2d_V, batch.loss_mask_BT,
                                       compute_dtype=cdt)
    return row_teacher_from_topk(batch.topk_ids_BTK, batch.topk_logprobs_BTK, t2d_V, t2d_index_V, batch.loss_mask_BT)


def step_counts(teacher, ttt_steps: int) -> list[int]:
    """Supervised positions of each TTT step (the loss normalisers before summing over ranks)."""
    if hasattr(teacher, "rows_for_step"):
        return [int(teacher.rows_for_step(k)[0].numel()) for k in range(ttt_steps)]
    return [int(teacher.for_step(k).mask_BT.sum()) for k in range(ttt_steps)]


def train_step(model: Eagle3Draft, batch: Batch, target_head_VH: torch.Tensor | None, used_Vd: torch.Tensor,
               t2d_V: torch.Tensor, t2d_index_V: torch.Tensor, ttt_steps: int, *, precision: str = "auto",
               impl: str = "fused", teacher=None, normalizers: list[float] | None = None,
               objective: Objective = KL) -> tuple[torch.Tensor, StepStats]:
    """One TTT forward + loss (the caller runs backward and the optimizer).

    impl="fused" (default): fused TTT attention + chunked loss, matmuls in the `precision` dtype
    (bf16 where supported) with fp32 master weights. impl="reference": the readable reference
    (fp32), kept for equivalence tests. `normalizers` (per TTT step) replace the batch's own
    supervised-position counts, for global normalisation over micro-batches and ranks.
    `objective` (model.loss) is the per-position loss: soft cross-entropy or an LK loss.
    """
    if teacher is None:
        teacher = make_teacher(batch, target_head_VH, used_Vd, t2d_V, t2d_index_V, precision=precision, impl=impl)
    # Step 0 at position t reads token t+1 (the target feature at t was computed reading token t).
    draft_ids_BT = shift_left(batch.input_ids_BT, 1)
    if impl == "reference":
        if normalizers is not None:
            raise ConfigError("normalizers are only supported by the fused path")
        g_steps = model.ttt_forward(batch.aux_BT3H, draft_ids_BT, ttt_steps, batch.attention_mask_BT)
        return ttt_loss(model, g_steps, teacher, objective)
    cdt = compute_dtype(precision, batch.aux_BT3H.device)
    with autocast(batch.aux_BT3H.device, cdt):
        g_steps = model(batch.aux_BT3H, draft_ids_BT, ttt_steps, batch.attention_mask_BT)
    # The loss allocates the step's largest buffers: free heap pages left by the teacher, the forward
    # and the last backward would otherwise stay resident under them (the step's peak RSS).
    release_free_heap(batch.aux_BT3H.device)
    return fused_ttt_loss(model, g_steps, teacher, compute_dtype=cdt, normalizers=normalizers, objective=objective)
