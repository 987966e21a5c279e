"""benchmarks/bench_quality.py at smoke size with a feature cache: the first arm writes it from the
live target, the second trains offline from it (the path the full-size runs take)."""

from __future__ import annotations

import json

from tests.support.procs import run_cli


def test_second_arm_trains_offline_from_the_first_arms_cache(tmp_path):
    out = tmp_path / "results"
    p = run_cli("benchmarks.bench_quality", "--smoke", "--arms", "eagle3,eagle3.1", "--steps", "3",
                "--cache", str(tmp_path / "cache"), "--no-real-tau", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "bench_quality_smoke.json").read_text())
    arms = {r["arm"]: r for r in res["arms"]}
    assert set(arms) == {"eagle3", "eagle3.1"} and res["equal_tokens"]
    assert arms["eagle3"]["train_tokens"] > 0 and arms["eagle3.1"]["steps"] == 3
    assert any((tmp_path / "cache").iterdir())   # the first arm wrote the features the second read
    # the cache is kept: a second run trains every arm offline from it, to the same losses; with
    # --jobs 2 the first arm too runs in the pool of fresh processes, beside the second
    p = run_cli("benchmarks.bench_quality", "--smoke", "--arms", "eagle3,eagle3.1", "--steps", "3", "--cache-ready",
                "--jobs", "2", "--cache", str(tmp_path / "cache"), "--no-real-tau", "--out", str(tmp_path / "again"))
    assert p.returncode == 0, p.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "bench_quality_smoke.json").read_text())["arms"]
    assert [r["arm"] for r in again] == ["eagle3", "eagle3.1"]
    for r in again:
        assert r["train_tokens"] == arms[r["arm"]]["train_tokens"]
        assert r["eval_loss"] == arms[r["arm"]]["eval_loss"]


def test_arms_without_a_shared_cache_keep_their_own(tmp_path):
    """Without --cache each arm caches (the recipe's replay) in its own directory: an arm with other
    features (dflash) used to find the first arm's cache in the recipe's runs/draft/features
    (relative to the working directory) and stop."""
    p = run_cli("benchmarks.bench_quality", "--smoke", "--arms", "eagle3,dflash", "--steps", "2",
                "--no-real-tau", "--out", str(tmp_path / "results"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    arms = json.loads((tmp_path / "results" / "bench_quality_smoke.json").read_text())["arms"]
    assert [r["arm"] for r in arms] == ["eagle3", "dflash"]
    assert not (tmp_path / "runs").exists()
