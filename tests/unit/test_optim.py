"""The Trainer's AdamW (train/optim.py) is torch's fused AdamW bit for bit, shares its state_dict both ways,
and on a single device never imports torch._dynamo (~160 MB of resident memory)."""

import copy

import torch

from draft_trainer.train.optim import AdamW
from tests.support.procs import run_code


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in ((7, 5), (13,), (3, 4, 2))]


def _run(opt_cls, params, steps: range, opt=None):
    opt = opt or opt_cls([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], lr=1e-2,
                         betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    for i in steps:
        g = torch.Generator().manual_seed(100 + i)
        opt.zero_grad(set_to_none=True)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        for group in opt.param_groups:      # what the Trainer's schedule does between steps
            group["lr"] = 1e-2 * (0.5 + 0.1 * i)
        opt.step()
    return opt


def test_equals_torch_fused_adamw_bit_for_bit_and_state_dicts_interchange():
    ours, ref = _params(0), _params(0)
    o, r = _run(AdamW, ours, range(4)), _run(torch.optim.AdamW, ref, range(4))
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(o.state[a][k], r.state[b][k]), k
    assert not torch.equal(ours[0], _params(0)[0])          # it did move the weights
    # Resume: each side's state_dict continues in the other class exactly like an uninterrupted run.
    x, y = [p.detach().clone().requires_grad_() for p in ours], [p.detach().clone().requires_grad_() for p in ours]
    x_opt = _run(torch.optim.AdamW, x, range(0))
    x_opt.load_state_dict(copy.deepcopy(o.state_dict()))   # (loading shares the tensors)
    y_opt = _run(AdamW, y, range(0))
    y_opt.load_state_dict(copy.deepcopy(r.state_dict()))
    _run(None, x, range(4, 6), x_opt), _run(None, y, range(4, 6), y_opt), _run(None, ours, range(4, 6), o)
    for a, b, c in zip(x, y, ours):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_single_device_training_does_not_import_dynamo():
    code = ("import sys, torch\n"
            "from draft_trainer.train.optim import AdamW\n"
            "p = [torch.nn.Parameter(torch.randn(4, 4))]\n"
            "o = AdamW(p, lr=1e-3, fused=True)\n"
            "for _ in range(2):\n"
            "    o.zero_grad(set_to_none=True); (p[0] ** 2).sum().backward(); o.step()\n"
            "o.load_state_dict(o.state_dict())\n"
            "assert 'torch._dynamo' not in sys.modules\n"
            "torch.optim.AdamW(p, fused=True).step()\n"
            "assert 'torch._dynamo' in sys.modules   # torch's own does import it (the check can fail)\n")
    res = run_code(code)
    assert res.returncode == 0, res.stderr[-2000:]
