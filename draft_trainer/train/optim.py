"""AdamW as the Trainer builds it, without importing torch._dynamo on a single device.

torch.optim wraps `Optimizer.add_param_group`, `zero_grad`, `state_dict`, `load_state_dict` and the
`adam` functional in dynamo-disabling decorators that import torch._dynamo on their first call (and
`Adam.step` imports it outright). Eager training never traces, but that import (sympy, mpmath, the
compiler stack) is ~160 MB of resident memory: on the SmolLM2-sized CPU step about an eighth of the
process's peak. `AdamW` here is torch's AdamW (same class hierarchy, parameter groups, state layout and
`state_dict`) whose fused step calls torch's own fused kernel (`torch.optim.adam._fused_adam`, what
`fused=True` runs) directly, and whose four wrapped methods are torch's undecorated functions. Results
are bit-identical to `torch.optim.AdamW(fused=True)` (tests/unit/test_optim.py). Anything else (foreach,
DTensor parameters under FSDP, a closure, a torch older than Adam's `decoupled_weight_decay`) takes
torch's own step.
"""

from __future__ import annotations

import torch
from torch.optim import adam as _torch_adam

_Base = torch.optim.Optimizer


def _undecorated(fn):
    return getattr(fn, "__wrapped__", fn)


class AdamW(torch.optim.AdamW):
    add_param_group = _undecorated(_Base.add_param_group)
    zero_grad = _undecorated(_Base.zero_grad)
    state_dict = _undecorated(_Base.state_dict)
    load_state_dict = _undecorated(_Base.load_state_dict)

    def step(self, closure=None):
        fused_step = getattr(_torch_adam, "_fused_adam", None)
        if closure is not None or fused_step is None or not all(
                g["fused"] and not g["differentiable"] and "decoupled_weight_decay" in g for g in self.param_groups):
            return super().step(closure)
        with torch.no_grad():
            for group in self.param_groups:
                params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
                has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
                beta1, beta2 = group["betas"]
                fused_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, getattr(self, "grad_scale", None),
                           getattr(self, "found_inf", None), amsgrad=group["amsgrad"], has_complex=has_complex,
                           beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                           eps=group["eps"], maximize=group["maximize"], capturable=group["capturable"],
                           differentiable=False, decoupled_weight_decay=group["decoupled_weight_decay"])
        return None
