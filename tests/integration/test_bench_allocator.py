"""The allocator benchmark runs the real trainer twice at once, on glibc and on jemalloc (smoke shapes), and the
two runs train the same numbers; without libjemalloc it refuses with the way to install it."""

import json

import pytest

from benchmarks import bench_allocator
from common.memory import find_jemalloc


def test_bench_allocator_smoke(tmp_path):
    if find_jemalloc() is None:   # a machine without libjemalloc2: the benchmark says what to install
        with pytest.raises(SystemExit, match="apt-get install libjemalloc2"):
            bench_allocator.main(["--smoke", "--steps", "6", "--out", str(tmp_path)])
        return
    bench_allocator.main(["--smoke", "--steps", "6", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "allocator_smoke.json").read_text())
    glibc, jem = data["rows"]
    assert (glibc["allocator"], jem["allocator"]) == ("glibc", "jemalloc")   # each ran on the malloc it was given
    assert glibc["steps"] == jem["steps"] == 6 and glibc["tokens"] == jem["tokens"] > 0
    assert data["max_loss_diff"] == 0.0                                       # the allocator changes no number
    assert jem["peak_rss_mb"] > 0 and len(jem["tokens_per_s_by_quarter"]) == 4
