"""The Triton soft-CE kernel equals the torch reference (run by Triton's CPU interpreter)."""

import subprocess
import sys

from tests.support.procs import REPO, env_with_repo

CHECK = r"""
import torch
from draft_trainer.model.linear_ce import soft_ce_rows_torch
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


RAGGED = r"""
import torch
from draft_trainer.model.linear_ce import soft_ce_rows_torch
from draft_trainer.model.kernels.soft_ce import soft_ce_rows_triton
g = torch.Generator().manual_seed(1)
# (rows, vocabulary, block): ragged row counts, vocabularies not a multiple of the block, a
# vocabulary smaller than the block, exactly one block, one column; bf16 storage too.
cases = [(1, 1, 64), (3, 65, 64), (7, 129, 32), (5, 200, 256), (4, 128, 128), (9, 1000, 128)]
for N, V, block in cases:
    for dtype in (torch.float32, torch.bfloat16):
        z = (torch.randn(N, V, generator=g) * 4).to(dtype)
        p = torch.softmax(torch.randn(N, V, generator=g) * 3, -1).to(dtype)
        z_ref, z_tri = z.float().clone(), z.clone()  # the reference in fp32 on the same stored values
        ce_r, am_r, ea_r = soft_ce_rows_torch(z_ref, p.float())
        ce_t, am_t, ea_t = soft_ce_rows_triton(z_tri, p, block=block)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(ce_t, ce_r, **tol, msg=f"ce {N},{V},{block},{dtype}")
        torch.testing.assert_close(ea_t, ea_r, **tol, msg=f"ea {N},{V},{block},{dtype}")
        torch.testing.assert_close(z_tri.float(), z_ref.to(dtype).float(), **tol, msg=f"grad {N},{V},{block},{dtype}")
        assert torch.equal(am_t, z.float().argmax(-1)), (N, V, block, dtype)
print("RAGGED-OK")
"""


def test_triton_soft_ce_ragged_rows_and_vocab_under_interpreter():
    env = env_with_repo()
    env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-c", RAGGED], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert res.returncode == 0 and "RAGGED-OK" in res.stdout, res.stderr[-3000:]


SELECT = r"""
import sys, warnings
import torch
{block}
from draft_trainer.model.kernels.select import soft_ce_backend
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    got = [soft_ce_backend("cuda"), soft_ce_backend("cuda"), soft_ce_backend("cpu")]
print(got, sum("Triton soft-CE kernel unavailable" in str(x.message) for x in w))
"""


def test_kernel_selection_triton_on_cuda_and_one_warning_without_it():
    """Real imports: with Triton importable CUDA gets "triton"; with `import triton` failing
    (sys.modules entry None: ImportError) CUDA falls back to "torch" with exactly one warning."""
    outs = []
    for block in ("", "sys.modules['triton'] = None"):
        res = subprocess.run([sys.executable, "-c", SELECT.format(block=block)], capture_output=True, text=True,
                             env=env_with_repo(), cwd=REPO, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        outs.append(res.stdout.strip())
    assert outs[0] == "['triton', 'triton', 'torch'] 0", outs[0]
    assert outs[1] == "['torch', 'torch', 'torch'] 1", outs[1]
