"""`make bench-smoke` end to end: every CPU benchmark script runs in --smoke mode as its own
process (real servers, real trainer), writes its JSON + markdown, run_all.json records each
script's wall time, and the results page is rendered with a summary row per benchmark.
The suite runs once per module (`smoke`); each make-bench script's own figures are then checked
from that run, one test per script, so no script is run twice. No timing assertions: smoke
figures are not measurements."""

import json
import subprocess
import sys

import pytest

from benchmarks import suite
from tests.support.procs import REPO, env_with_repo, run_cli


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`run_all --smoke` once: (its output directory, the finished process)."""
    out = tmp_path_factory.mktemp("bench_smoke")
    return out, run_cli("benchmarks.run_all", "--smoke", "--out", str(out), timeout=880)


def _result(smoke, stem: str) -> dict:
    out, res = smoke
    path = out / f"{stem}.json"
    assert path.is_file(), f"{stem}.json not written; run_all: " + res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(path.read_text())


@pytest.mark.timeout(900)
def test_run_all_smoke_end_to_end(smoke):
    tmp_path, res = smoke
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    benches = suite.select("")
    runs = json.loads((tmp_path / "run_all.json").read_text())["runs"]
    for i, b in enumerate(benches, 1):
        data = json.loads((tmp_path / f"{b.stem(True)}.json").read_text())
        assert data["machine"], b.name
        assert (tmp_path / f"{b.stem(True)}.md").is_file(), b.name
        assert runs[b.name]["status"] == "ok" and runs[b.name]["smoke"] and runs[b.name]["wall_s"] > 0, runs[b.name]
        assert f"[{i}/{len(benches)}] {b.name}: ok in" in res.stdout  # progress is printed per script
    page = (tmp_path / "benchmarks.md").read_text()
    summary = page.split("## Summary", 1)[1].split("## Machine", 1)[0]
    assert "| benchmark | figure measured | target | met? |" in summary
    for b in benches:
        rows = [line for line in summary.splitlines() if line.startswith(f"| {b.title} |")]
        assert rows and all(r.endswith("| n/a (smoke) |") for r in rows), (b.title, rows)
        assert f"Reproduce: `{b.reproduce_command()}`" in page
    assert "These are not measurements" in page


def test_serving_dataplane_and_overload_smoke_figures(smoke):
    for stem in ("serving_overhead_smoke", "dataplane_smoke", "dataplane_inflight2_smoke", "overload_smoke"):
        data = _result(smoke, stem)
        assert data["machine"]["cores"] and (smoke[0] / f"{stem}.md").read_text().startswith(f"# {stem}")
    serving = _result(smoke, "serving_overhead_smoke")
    assert serving["ratio"] > 0 and len(serving["wire_tok_s"]) == len(serving["inprocess_tok_s"]) >= 1
    for stem in ("dataplane_smoke", "dataplane_inflight2_smoke"):
        data = _result(smoke, stem)
        assert data["ratio_vs_raw_flight"] > 0 and data["ratio_vs_grpc_bytes"] > 0
    overload = _result(smoke, "overload_smoke")
    assert overload["other_errors"] == [] and overload["healthy_at_end"] and overload["exit_status"] == 0
    assert overload["samples"] == overload["expected_samples"]
    assert overload["resource_exhausted"] > 0  # 4x the queue budget must be refused in part


def test_pool_smoke_figures(smoke):
    out = _result(smoke, "pool_smoke")
    assert [r["servers"] for r in out["scaling"]] == [1, 2]
    for r in out["scaling"]:
        assert r["samples"] == r["servers"] * 8 and r["samples_per_s"] > 0
    ov = out["overlap_sleep"]
    assert ov["pool"]["steps"] == ov["sync"]["steps"] == 6
    assert 0 <= ov["pool"]["data_wait_fraction"] <= 1
    md = (smoke[0] / "pool_smoke.md").read_text()
    assert "| servers | samples/s" in md and "data-wait fraction" in md


def test_prepare_data_smoke_figures(smoke):
    r = _result(smoke, "prepare_data_smoke")
    assert r["smoke"] and 0 < r["samples_kept"] <= r["samples_in"]
    assert r["tokens_untruncated"] >= r["tokens"] > 0
    for path in ("pipeline", "tokenizer", "render_tokenize"):
        assert r["best"][path]["wall_s"] > 0 and r["best"][path]["cpu_s"] > 0
    md = (smoke[0] / "prepare_data_smoke.md").read_text()
    assert f"| prepare-data ({r['samples_in']} records in" in md and "overhead vs bare tokenizer" in md


def test_train_step_smoke_figures(smoke):
    out = _result(smoke, "bench_train_step_smoke")
    assert {r["impl"] for r in out["results"]} == {"reference-fp32", "fused-fp32", "fused-auto"}
    for r in out["results"]:
        assert r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["step_s"] > 0
    ref, fused = (next(r for r in out["results"] if r["impl"] == i) for i in ("reference-fp32", "fused-fp32"))
    assert abs(ref["loss"] - fused["loss"]) < 1e-3 * abs(ref["loss"])   # same math, same data
    assert "| fused-auto |" in (smoke[0] / "bench_train_step_smoke.md").read_text()


def test_trainer_smoke_figures(smoke):
    rows = _result(smoke, "trainer_smoke")["rows"]
    assert [(r["ranks"], r["features"].split()[0]) for r in rows] == [(1, "live"), (1, "feature"), (2, "live"),
                                                                      (2, "feature")]
    assert all(r["tokens_per_s"] > 0 and r["steps"] == 4 for r in rows)
    assert all(len(r["peak_rss_mb_per_rank"]) == r["ranks"] for r in rows)


def test_run_all_reports_a_failing_script_and_runs_the_rest(tmp_path):
    """A script that fails (bench_prepare_data given a missing input file) or overruns its time
    limit (bench_dataplane given 2 s) is reported, the next one still runs, the page is still
    rendered, and the exit status is 1."""
    bad = tmp_path / "missing.json"
    script = f"""
import dataclasses, sys
from benchmarks import run_all, suite
changes = {{"prepare_data": dict(args=("--input", {str(bad)!r})), "dataplane": dict(smoke_timeout_s=2.0)}}
suite.BENCHMARKS = tuple(dataclasses.replace(b, **changes.get(b.name, {{}})) for b in suite.BENCHMARKS)
sys.exit(run_all.main(["--smoke", "--only", "prepare_data,dataplane,overload", "--out", {str(tmp_path)!r}]))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                         env=env_with_repo(), timeout=600)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    runs = json.loads((tmp_path / "run_all.json").read_text())["runs"]
    assert runs["prepare_data"]["status"].startswith("failed (exit")
    assert runs["dataplane"]["status"] == "timed out after 2 s" and runs["dataplane"]["wall_s"] < 60
    assert runs["overload"]["status"] == "ok" and (tmp_path / "overload_smoke.json").is_file()
    assert "FAILED: prepare_data (failed (exit" in res.stderr and "dataplane (timed out after 2 s)" in res.stderr
    assert (tmp_path / "benchmarks.md").is_file()

