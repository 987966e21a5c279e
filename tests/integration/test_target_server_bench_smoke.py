"""The serving benchmarks run end to end in --smoke mode and write JSON + markdown (no timing
assertions: the figures themselves are only reported)."""

import json

import pytest

from tests.support.procs import run_cli


@pytest.mark.parametrize("script,name", [("bench_serving", "serving_overhead_smoke"),
                                         ("bench_dataplane", "dataplane_smoke"),
                                         ("bench_overload", "overload_smoke")])
def test_benchmark_smoke(script, name, tmp_path):
    res = run_cli(f"benchmarks.{script}", "--smoke", "--out", str(tmp_path), timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["machine"]["cores"] and (tmp_path / f"{name}.md").read_text().startswith(f"# {name}")
    if script == "bench_serving":
        assert data["ratio"] > 0 and len(data["wire_tok_s"]) == len(data["inprocess_tok_s"]) >= 1
    elif script == "bench_dataplane":
        assert data["ratio_vs_raw_flight"] > 0 and data["ratio_vs_grpc_bytes"] > 0
    else:
        assert data["other_errors"] == [] and data["healthy_at_end"] and data["exit_status"] == 0
        assert data["samples"] == data["expected_samples"]
        assert data["resource_exhausted"] > 0  # 4x the queue budget must be refused in part
