"""The generation, batch-invariance and regenerate benchmarks still run (tiny model, seconds); figures are not checked."""

import json

from benchmarks import bench_batch_invariant, bench_generate


def test_bench_generate_smoke(tmp_path):
    assert bench_generate.main(["--smoke", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "generate_smoke.json").read_text())
    assert r["batched"]["tokens"] == 8 * 8 and r["one_at_a_time"]["tokens"] == 2 * 8


def test_bench_batch_invariant_smoke(tmp_path):
    assert bench_batch_invariant.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "batch_invariant_smoke.md").is_file()


def test_bench_regenerate_smoke_with_a_kill(tmp_path):
    from benchmarks import bench_regenerate

    assert bench_regenerate.main(["--smoke", "--kill", "--out", str(tmp_path)]) == 0  # 0: every chat written once
    r = json.loads((tmp_path / "regenerate_smoke.json").read_text())
    assert r["lines"] == r["distinct_ids"] == r["n"]


def test_bench_regenerate_sizing_sweep_smoke(tmp_path):
    from benchmarks import bench_regenerate

    assert bench_regenerate.main(["--smoke", "--sizes", "2x1,4x2", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "regenerate_smoke_sizing.json").read_text())
    assert [s["written"] for s in r["sizes"]] == [r["n"], r["n"]]  # each sizing wrote every chat (own file)
    assert all(max(map(float, s["mean_decode_batch"].split("/"))) >= 1 for s in r["sizes"])  # metrics scraped


def test_bench_regen_memory_smoke_compares_two_trees(tmp_path):
    """Both variants (this tree and HEAD in a git worktree) regenerate the same answers; each server's
    peak RSS is read from its own process."""
    from benchmarks import bench_regen_memory

    assert bench_regen_memory.main(["--smoke", "--out", str(tmp_path)]) == 0  # 0: the same answers
    runs = json.loads((tmp_path / "regen_memory_smoke.json").read_text())["runs"]
    assert [r["variant"].split()[0] for r in runs] == ["this", "at"]
    assert all(r["written"] == 12 and min(map(int, r["peak_rss_mb"].split("/"))) > 100 for r in runs)
