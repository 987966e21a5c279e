"""`make bench-smoke` end to end: every CPU benchmark script runs in --smoke mode as its own
process (real servers, real trainer), writes its JSON + markdown, run_all.json records each
script's wall time, and the results page is rendered with a summary row per benchmark.
No timing assertions: smoke figures are not measurements."""

import json
import subprocess
import sys

import pytest

from benchmarks import suite
from tests.support.procs import REPO, env_with_repo, run_cli


@pytest.mark.timeout(900)
def test_run_all_smoke_end_to_end(tmp_path):
    res = run_cli("benchmarks.run_all", "--smoke", "--out", str(tmp_path), timeout=880)
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

