"""deploy/ray: the launcher on a private local Ray instance (CPU, 127.0.0.1): two HF target
servers as actors, one Ray Train worker running the real trainer against them, endpoints wired
automatically; a short real run completes and the servers are drained and stopped afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.deploy.conftest import require_module
from tests.support.procs import REPO, env_with_repo

pytestmark = pytest.mark.ray


def _launch(*args: str, timeout: float = 420.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.ray.launch", *args], capture_output=True, text=True,
                          timeout=timeout, env=env_with_repo(), cwd=REPO)


def test_bad_input_is_refused_before_ray_starts(tmp_path):
    r = _launch("--output", str(tmp_path), "data.path=/x", "optim.lrr=1", timeout=60)
    assert r.returncode == 2 and "optim.lrr" in r.stderr and "did you mean 'lr'" in r.stderr
    r = _launch("--output", str(tmp_path), "--server-args", "--backend nope", "data.path=/x", timeout=60)
    assert r.returncode == 2 and "--backend" in r.stderr
    assert not (tmp_path / "endpoints.txt").exists()


def test_short_real_run_on_a_local_ray_instance(tmp_path, tiny_llama, tiny_dataset):
    require_module("ray")
    out = tmp_path / "run"
    r = _launch("--num-cpus", "2", "--num-servers", "2", "--cpus-per-server", "0.5", "--cpus-per-trainer", "1",
                "--bind", "127.0.0.1", "--server-args", f"--backend hf --model {tiny_llama} --dtype fp32",
                "--output", str(out), f"data.path={tiny_dataset}", "max_steps=4", "batch_size=2",
                "model.ttt_steps=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    endpoints = (out / "endpoints.txt").read_text().split()
    assert len(endpoints) == 2 and len(set(endpoints)) == 2
    assert all(e.startswith("127.0.0.1:") for e in endpoints)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["endpoints"] == endpoints
    assert summary["steps"] == 4 and summary["samples_consumed"] == 8
    assert (out / "train" / "checkpoints" / "latest" / "COMPLETE").is_file()
    lines = (out / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    (sd,) = json.loads((out / "prometheus" / "specrelay-target.json").read_text())
    assert len(sd["targets"]) == 2 and all(t.startswith("127.0.0.1:") for t in sd["targets"])
    # The servers were drained and stopped with the run: nothing answers on their ports any more.
    from draft_trainer.client.target import TargetClient

    for e in endpoints:
        c = TargetClient(e)
        assert not c.healthy(timeout_s=2.0)
        c.close()
