"""The prepare-data benchmark runs end to end in --smoke mode (no timing assertions)."""

import json

from tests.support.procs import run_cli


def test_bench_prepare_data_smoke(tmp_path, smollm2_tokenizer_dir):
    out = tmp_path / "bench.json"
    res = run_cli("benchmarks.bench_prepare_data", "--smoke", "--limit", "60", "--model", str(smollm2_tokenizer_dir),
                  "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["smoke"] and r["samples_in"] == 60 and 0 < r["samples_kept"] <= 60
    assert r["tokens_untruncated"] >= r["tokens"] > 0
    for path in ("pipeline", "tokenizer", "render_tokenize"):
        assert r["best"][path]["wall_s"] > 0 and r["best"][path]["cpu_s"] > 0
    assert "| prepare-data (60 records in" in res.stdout and "overhead vs bare tokenizer" in res.stdout
