"""The trainer benchmark still runs (smoke mode: tiny shapes, a few steps, real processes)."""

import json

from benchmarks import bench_trainer


def test_bench_trainer_smoke(tmp_path):
    bench_trainer.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "trainer_smoke.json").read_text())
    rows = data["rows"]
    assert [(r["ranks"], r["features"].split()[0]) for r in rows] == [(1, "live"), (1, "feature"), (2, "live"),
                                                                      (2, "feature")]
    assert all(r["tokens_per_s"] > 0 and r["steps"] == 4 for r in rows)
    assert all(len(r["peak_rss_mb_per_rank"]) == r["ranks"] for r in rows)
