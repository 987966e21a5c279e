"""The training-step benchmark's --smoke mode runs end to end and writes JSON + markdown."""

import json
import subprocess
import sys

from tests.support.procs import REPO, env_with_repo


def test_bench_train_step_smoke(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/bench_train_step.py", "--smoke", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, env=env_with_repo(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "bench_train_step_smoke.json").read_text())
    impls = {r["impl"] for r in out["results"]}
    assert impls == {"reference-fp32", "fused-fp32", "fused-auto"}
    for r in out["results"]:
        assert r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["step_s"] > 0
    ref, fused = (next(r for r in out["results"] if r["impl"] == i) for i in ("reference-fp32", "fused-fp32"))
    assert abs(ref["loss"] - fused["loss"]) < 1e-3 * abs(ref["loss"])   # same math, same data
    assert "| fused-auto |" in (tmp_path / "bench_train_step_smoke.md").read_text()
