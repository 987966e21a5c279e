"""benchmarks/bench_replay.py --smoke: both arms train for the same time on a real tiny target;
the replay arm asks the target for one epoch's samples only (figures are not measurements)."""

from __future__ import annotations

import json

from tests.support.procs import run_cli


def test_bench_replay_smoke(tmp_path):
    res = run_cli("benchmarks.bench_replay", "--smoke", "--out", str(tmp_path), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "replay_smoke.json").read_text())
    base, rep = data["rows"]
    assert base["epochs"] > 1 and rep["epochs"] > 1
    steps_samples = 4  # batch_size of the smoke arms
    assert base["target_samples"] >= base["steps"] * steps_samples   # every trained sample came from the target
    assert rep["target_samples"] == 16                               # one epoch of the 16-sample dataset
    assert data["epoch0_steps_compared"] > 0
