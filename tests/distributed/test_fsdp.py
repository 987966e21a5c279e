"""FSDP2 on gloo (2 real ranks via torchrun) vs one process: same losses; DCP resume is exact."""

import json
import subprocess
import sys

from tests.support.procs import REPO, env_with_repo

WORKER = str(REPO / "tests" / "distributed" / "fsdp_worker.py")


def _run(cmd, tmp_path):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env_with_repo(), cwd=REPO)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])


def test_two_ranks_match_one_and_resume_exactly(tmp_path):
    one = _run([sys.executable, WORKER, str(tmp_path / "one")], tmp_path)
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                WORKER, str(tmp_path / "two")], tmp_path)
    for a, b in zip(one["first"] + one["rest"], two["first"] + two["rest"]):
        assert abs(a - b) < 1e-5, (one, two)
    # Restoring the step-2 checkpoint into a fresh model replays the same losses bit for bit.
    assert one["replay"] == one["rest"]
    assert two["replay"] == two["rest"]
    # Each rank's own state was gathered into the checkpoint.
    assert two["ranks"] == {"0": {"cursor": [0, 2]}, "1": {"cursor": [0, 3]}}
    assert one["first"][1] < one["first"][0]
