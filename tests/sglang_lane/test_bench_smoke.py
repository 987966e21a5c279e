"""The SGLang-vs-HF benchmark runs end to end in --smoke mode and writes its JSON + table."""

import json

from tests.support.procs import run_cli


def test_bench_sglang_backend_smoke(tmp_path):
    res = run_cli("benchmarks.bench_sglang_backend", "--smoke", "--out", str(tmp_path), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "bench_sglang_backend_smoke.json").read_text())
    for name in ("hf", "sglang"):
        r = data["results"][name]
        assert r["tokens"] == 2 * 2 * 64 and r["tokens_per_s"] > 0 and r["startup_s"] > 0 and r["peak_rss_mb"] > 0
    assert "| sglang |" in (tmp_path / "bench_sglang_backend_smoke.md").read_text()


def test_bench_generate_on_sglang_smoke(tmp_path):
    res = run_cli("benchmarks.bench_generate", "--backend", "sglang", "--smoke", "--out", str(tmp_path), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "generate_sglang_smoke.json").read_text())
    assert data["backend"] == "sglang" and data["kv_pool_tokens"] > 0
    assert data["batched"]["tokens"] == 8 * 8 and data["one_at_a_time"]["tokens"] == 2 * 8
