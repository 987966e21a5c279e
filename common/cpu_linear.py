"""fp32 linear layers with their weights prepacked once for oneDNN: a model's few-row forwards on a CPU.

Legend (shapes): R rows in a forward (batch x tokens), I in features, O out features.

Why: at a few rows (a K+1-token verification, a short decode batch) torch sends an fp32 `F.linear`
to MKL's sgemm, which packs the weight matrix into its panel layout on every call. A model whose
weights do not stay in cache (SmolLM2-135M: 0.42 GB of linear weights per forward) then reads each
weight twice and writes it once per forward. oneDNN with the weight reordered once at load reads it
once. Measured on the 2-core AVX2 EPYC, SmolLM2-135M fp32, 2 threads, context 200 (docs/notes/issue-20.md,
session 24): the decoder body over 6 tokens cost ~1.56x a 1-token step with torch's linears and ~1.2x
with these, and the 576 x 49,152 vocabulary head at one row 9.1 ms vs 5.2 ms (at 6 rows 26.8 vs 11.1).
A one-row forward through the body's small linears costs about the same either way.

Only fp32: in bf16 the evaluator relies on torch's linears giving bit-identical rows whatever the
number of rows (decode.py, rowwise_attention.py), which a different kernel for k+1 rows than for one
would break. In fp32 a verification and a greedy step never were bit-identical (sgemm vs gemv);
every evaluation still checks its output against greedy decoding token for token.

The original weight stays on the module (ties, `state_dict`, anything reading `.weight`), so a
prepacked model holds its linear weights twice. Inference only: with autograd on, torch's path runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PrepackedLinear", "linear_fn", "prepack_available", "prepack_linears"]


def prepack_available() -> bool:
    """True where this torch build has oneDNN and the prepacked-linear ops inductor uses."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PrepackedLinear(nn.Module):
    """An `nn.Linear`'s forward through oneDNN with the weight packed once (module doc)."""

    def __init__(self, linear: nn.Linear, rows_hint: int = 8) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias          # the same Parameters (ties kept)
        # an opaque oneDNN tensor; a plain attribute so that it stays out of state_dict and .to()
        self._packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)

    def forward(self, x_RI: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x_RI.requires_grad or self.weight.requires_grad):
            return F.linear(x_RI, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x_RI, self._packed, bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prepacked=oneDNN"


def _qualifies(weight_OI: torch.Tensor) -> bool:
    return prepack_available() and weight_OI.dtype == torch.float32 and weight_OI.device.type == "cpu"


def linear_fn(weight_OI: torch.Tensor, rows_hint: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """x_RI -> x_RI @ weight_OI.T for inference code that holds bare weights (the EAGLE-3 drafter's fused
    path): through oneDNN with the weight packed once where it qualifies (fp32, CPU), else `F.linear`."""
    if not _qualifies(weight_OI):
        return functools.partial(F.linear, weight=weight_OI)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight_OI.detach(), rows_hint)
    return lambda x_RI: torch.ops.mkldnn._linear_pointwise(x_RI, packed, None, "none", [], "")


def prepack_linears(model: nn.Module, rows_hint: int = 8) -> int:
    """Replaces every fp32 CPU `nn.Linear` in `model` (its output head included) by a `PrepackedLinear`
    in place; returns how many. 0, model untouched, where oneDNN is missing or nothing qualifies."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and _qualifies(child.weight)]
    for parent, name, child in swaps:
        setattr(parent, name, PrepackedLinear(child, rows_hint))
    return len(swaps)
