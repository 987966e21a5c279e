"""The dtype benchmark times the real tiny model in both dtypes in one process and says what `auto` picks here."""

import json

from benchmarks import bench_target_dtype
from benchmarks.report import render
from common.hardware import cpu_has_bf16, pick_dtype


def test_bench_target_dtype_smoke(tmp_path):
    bench_target_dtype.main(["--smoke", "--reps", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "target_dtype_smoke.json").read_text())
    shapes = ("features", "regeneration", "greedy token", "verification")
    for dt in ("fp32", "bf16"):
        assert all(data["ms"][dt][s] > 0 for s in shapes)
    assert all(abs(data["bf16_over_fp32"][s] - data["ms"]["bf16"][s] / data["ms"]["fp32"][s]) < 1e-9 for s in shapes)
    assert data["auto_picks"] == pick_dtype("auto") == ("bf16" if cpu_has_bf16() else "fp32")
    assert "bf16 / fp32 time on this CPU" in render(tmp_path, smoke=True)   # its row on the results page
