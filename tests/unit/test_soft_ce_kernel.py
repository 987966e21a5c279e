"""The Triton soft-CE kernel equals the torch reference (run by Triton's CPU interpreter)."""

import subprocess
import sys

from tests.support.procs import REPO, env_with_repo

CHECK = r"""
import torch
from draft_trainer.methods.eagle3.fused_loss import soft_ce_rows_torch
from draft_trainer.model.kernels.soft_ce import soft_ce_rows_triton
g = torch.Generator().manual_seed(0)
N, V = 6, 300
z = torch.randn(N, V, generator=g) * 3
p = torch.softmax(torch.randn(N, V, generator=g) * 2, -1)
p[2] = 0.0
p[2, 7] = 1.0                                # a one-hot teacher row
z_ref, z_tri = z.clone(), z.clone()
ce_r, am_r, ea_r = soft_ce_rows_torch(z_ref, p)
ce_t, am_t, ea_t = soft_ce_rows_triton(z_tri, p, block=128)   # several blocks per row, a ragged tail
# and against plain autograd of the definition
zz = z.clone().requires_grad_()
ce_a = -(p * torch.log_softmax(zz, -1)).sum(-1)
ce_a.sum().backward()
torch.testing.assert_close(ce_t, ce_a.detach(), rtol=1e-5, atol=1e-5)
torch.testing.assert_close(z_tri, zz.grad, rtol=1e-5, atol=1e-7)
ea_a = torch.minimum(p, torch.softmax(z, -1)).sum(-1)
torch.testing.assert_close(ea_t, ea_a, rtol=1e-5, atol=1e-6)
torch.testing.assert_close(ce_t, ce_r, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(ea_t, ea_r, rtol=1e-5, atol=1e-6)
torch.testing.assert_close(z_tri, z_ref, rtol=1e-5, atol=1e-7)
assert torch.equal(am_t, am_r), (am_t, am_r)
assert float(ce_r.abs().sum()) > 0 and float(z_ref.abs().sum()) > 0
print("KERNEL-OK")
"""


def test_triton_soft_ce_matches_torch_under_interpreter():
    env = env_with_repo()
    env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert res.returncode == 0 and "KERNEL-OK" in res.stdout, res.stderr[-3000:]
