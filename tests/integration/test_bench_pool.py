"""benchmarks/bench_pool.py --smoke runs end to end and writes its JSON + markdown (no timing checks)."""

import json
import subprocess
import sys

from tests.support.procs import REPO, env_with_repo


def test_bench_pool_smoke(tmp_path):
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_pool", "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env_with_repo(), cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "pool_smoke.json").read_text())
    assert [r["servers"] for r in out["scaling"]] == [1, 2]
    for r in out["scaling"]:
        assert r["samples"] == r["servers"] * 8 and r["samples_per_s"] > 0
    ov = out["overlap_sleep"]
    assert ov["pool"]["steps"] == ov["sync"]["steps"] == 6
    assert 0 <= ov["pool"]["data_wait_fraction"] <= 1
    md = (tmp_path / "pool_smoke.md").read_text()
    assert "| servers | samples/s" in md and "data-wait fraction" in md
