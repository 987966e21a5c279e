"""The generation and batch-invariance benchmarks still run (tiny model, seconds); figures are not checked."""

import json

from benchmarks import bench_batch_invariant, bench_generate


def test_bench_generate_smoke(tmp_path):
    assert bench_generate.main(["--smoke", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "generate_smoke.json").read_text())
    assert r["batched"]["tokens"] == 8 * 8 and r["one_at_a_time"]["tokens"] == 2 * 8


def test_bench_batch_invariant_smoke(tmp_path):
    assert bench_batch_invariant.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "batch_invariant_smoke.md").is_file()
