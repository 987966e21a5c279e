"""The results-page renderer on small handmade result files: headline figures vs targets, the
stated runtime, the demo curve, and a loud error naming the file and key for a missing field."""

import json

import pytest

from benchmarks import report, suite
from benchmarks.suite import BenchmarkResultError

MACHINE = {"cpu": "Test CPU", "cores": 2, "load_avg_1m": 0.5, "python": "3.11", "torch": "2.13.0+cpu",
           "platform": "Linux-test", "pyarrow": "26"}


def write(d, stem, data, md=None):
    (d / f"{stem}.json").write_text(json.dumps({"machine": MACHINE, **data}))
    if md is not None:
        (d / f"{stem}.md").write_text(f"# {stem}\n\n{md}\n")


def summary_rows(page: str) -> dict[str, list[str]]:
    body = page.split("## Summary", 1)[1].split("## Machine", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("benchmark",):
            rows.setdefault(cells[0], []).append(" | ".join(cells[1:]))
    return rows


def test_headlines_targets_sections_and_missing_results(tmp_path):
    write(tmp_path, "serving_overhead", {"ratio": 0.95, "target_ratio": 0.9}, "| path | x |\n|---|---|\n| a | 1 |")
    write(tmp_path, "dataplane", {"ratio_vs_raw_flight": 0.5, "ratio_vs_grpc_bytes": 2.5, "config": {"inflight": 1},
                                  "targets": {"vs_raw_flight": 0.8, "vs_grpc_bytes": 2.0}})
    write(tmp_path, "prepare_data", {"overhead_vs_tokenizer": {"cpu_s": 0.31, "wall_s": 0.2}, "target_overhead": 0.25,
                                     "samples_in": 100})
    page = report.render(tmp_path)
    rows = summary_rows(page)
    assert "**0.95x**" in rows["Serving overhead"][0] and rows["Serving overhead"][0].endswith("| yes")
    raw, grpc = rows["Data plane vs raw Flight and gRPC"]
    assert "**0.50x**" in raw and raw.endswith("**no**") and "**2.50x**" in grpc and grpc.endswith("yes")
    assert "**+31.0%**" in rows["prepare-data overhead"][0] and rows["prepare-data overhead"][0].endswith("**no**")
    assert rows["Overload"][0].startswith("not run")
    # The section carries the script's table without its title, and the command to reproduce it.
    section = page.split("### Serving overhead", 1)[1].split("###", 1)[0]
    assert "| a | 1 |" in section and "# serving_overhead" not in section
    assert "Reproduce: `python -m benchmarks.bench_serving`" in section
    assert "| serving_overhead | Test CPU | 2 | 0.5 |" in page
    assert "_(this run wrote no markdown table; see the JSON)_" in page.split("### Data plane vs raw", 1)[1]
    assert "No result yet (`overload.json`): run `python -m benchmarks.bench_overload`" in page
    assert "run `make demo` to produce it" in page


def test_missing_field_fails_naming_file_and_key(tmp_path):
    write(tmp_path, "dataplane", {"ratio_vs_raw_flight": 0.9, "config": {"inflight": 1},
                                  "targets": {"vs_raw_flight": 0.8, "vs_grpc_bytes": 2.0}})
    with pytest.raises(BenchmarkResultError) as e:
        report.render(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "dataplane.json") in msg and "'ratio_vs_grpc_bytes'" in msg
    assert "python -m benchmarks.bench_dataplane" in msg  # says how to fix it


def test_nested_missing_field_and_missing_machine(tmp_path):
    write(tmp_path, "pool", {"scaling": [{"servers": 1, "speedup": 1.0}, {"servers": 4, "speedup": 3.9}],
                             "overlap_sleep": {"pool": {"data_wait_fraction": 0.01}, "sync": {}}})
    with pytest.raises(BenchmarkResultError, match=r"pool\.json: missing key 'overlap_sleep\.sync\.data_wait_fraction'"):
        report.render(tmp_path)
    (tmp_path / "pool.json").unlink()
    (tmp_path / "overload.json").write_text(json.dumps({"idle_rss_kib": 1}))
    with pytest.raises(BenchmarkResultError, match=r"overload\.json: missing key 'machine'"):
        report.render(tmp_path)


def test_train_step_vs_specforge_and_trainer(tmp_path):
    def row(impl, T, tps, rss, cpu=None):
        return {"impl": impl, "T": T, "tokens_per_s": tps, "tokens_per_cpu_s": cpu or tps, "peak_rss_mb": rss}

    write(tmp_path, "bench_train_step", {"results": [
        row("fused-auto", 512, 300.0, 600.0), row("specforge-float32", 512, 100.0, 1000.0),
        row("specforge-bfloat16", 512, 250.0, 700.0), {"impl": "fused-fp32", "T": 512, "error": "oom"}]})
    trainer_rows = [{"ranks": n, "features": f, "tokens_per_s": tps, "data_wait_fraction": w}
                    for n, f, tps, w in ((1, "live synthetic server", 100.0, 0.02), (1, "feature cache (offline)", 120.0, 0.0),
                                         (2, "live synthetic server", 150.0, 0.04), (2, "feature cache (offline)", 180.0, 0.01))]
    write(tmp_path, "trainer", {"rows": trainer_rows})
    rows = summary_rows(report.render(tmp_path))
    fp32, bf16 = rows["Training step vs SpecForge"]
    assert "float32: T=512 **3.00x** tokens/s" in fp32 and "**0.60x** RSS" in fp32 and fp32.endswith("yes")
    assert "bfloat16: T=512 **1.20x**" in bf16 and bf16.endswith("**no**")
    t = rows["Trainer: 1 vs 2 ranks, live vs cached features"][0]
    assert "live **1.50x**, cache **1.50x**" in t and "cache vs live (1 rank) 1.20x" in t and t.endswith("—")
    write(tmp_path, "trainer", {"rows": trainer_rows[:3]})  # the 2-rank cache run is missing
    with pytest.raises(BenchmarkResultError, match="trainer.json: missing key '2 rank feature'"):
        report.render(tmp_path)


def test_demo_curve_and_runtime(tmp_path):
    (tmp_path / report.DEMO_CURVE).write_text(json.dumps([{"train_tokens": 0, "tau": 1.0},
                                                          {"train_tokens": 2_000_000, "tau": 2.2}]))
    (tmp_path / report.RUN_LOG).write_text(json.dumps({"runs": {"pool": {
        "smoke": False, "status": "ok", "wall_s": 240.0, "unix_time": 0, "load_avg_start": 1.5}}}))
    page = report.render(tmp_path)
    demo = summary_rows(page)["Acceptance length vs training tokens (demo)"][0]
    assert "**2.20** after 2,000,000 training tokens" in demo and demo.endswith("yes")
    assert "| 2,000,000 | 2.200 |" in page
    runtime = page.split("## Runtime", 1)[1].split("## Results", 1)[0]
    limits = sum(b.timeout_s for b in suite.BENCHMARKS if b.in_make_bench)
    assert f"bounded by **{limits / 60:.0f} min**" in runtime
    assert "| bench_pool | 30 min | 4 min (load 1.5) | ok |" in runtime
    (tmp_path / report.DEMO_CURVE).write_text(json.dumps([{"train_tokens": 10}]))
    with pytest.raises(BenchmarkResultError, match=r"demo_tau_curve\.json: missing key 'points\.0\.tau'"):
        report.render(tmp_path)


def test_smoke_page_goes_next_to_the_results(tmp_path):
    write(tmp_path, "serving_overhead_smoke", {"ratio": 0.2, "target_ratio": 0.9})
    dest = report.write_page(tmp_path, smoke=True)
    assert dest == tmp_path / "benchmarks.md"
    page = dest.read_text()
    assert "These are not measurements" in page and summary_rows(page)["Serving overhead"][0].endswith("n/a (smoke)")


def test_select_rejects_unknown_names():
    assert [b.name for b in suite.select("pool,trainer")] == ["pool", "trainer"]
    assert "sglang_bf16" not in [b.name for b in suite.select("")]
    with pytest.raises(suite.SpecRelayError, match="unknown benchmark.*nope.*choose from"):
        suite.select("pool,nope")
