"""The tokenized dataset on disk: streamed multi-batch writes, zero-copy memory-mapped reads,
atomic replacement."""

import numpy as np
import pytest

from common.errors import DataError
from draft_trainer.data.dataset import DatasetWriter, TokenizedDataset, write_tokenized_dataset


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        t = int(rng.integers(1, 40))
        yield 100 + i, rng.integers(0, 500, size=t).astype(np.int32), rng.integers(0, 2, size=t).astype(np.uint8)


def test_multi_batch_roundtrip_is_memory_mapped(tmp_path):
    rows = list(_rows(23))
    write_tokenized_dataset(tmp_path / "ds", rows, {"tokenizer_fingerprint": "abc"}, rows_per_batch=5)
    ds = TokenizedDataset(tmp_path / "ds")
    assert len(ds) == 23 and ds.tokenizer_fingerprint == "abc" and ds.meta["num_samples"] == 23
    assert ds.lengths.tolist() == [len(r[1]) for r in rows]
    for i, (sid, ids, mask) in enumerate(rows):
        got = ds[i]
        assert got[0] == sid and np.array_equal(got[1], ids) and np.array_equal(got[2], mask)
        assert not got[1].flags.owndata  # a view into the memory map, not a copy
    assert ds[-1][0] == rows[-1][0]
    with pytest.raises(IndexError):
        ds[23]


def test_replacement_is_atomic_and_failures_leave_no_trace(tmp_path):
    write_tokenized_dataset(tmp_path / "ds", list(_rows(3)), {"v": 1})
    with pytest.raises(RuntimeError):
        with DatasetWriter(tmp_path / "ds") as w:
            w.add(1, [1, 2], [0, 1])
            raise RuntimeError("crash mid-write")
    assert TokenizedDataset(tmp_path / "ds").meta["v"] == 1  # the old dataset is untouched
    write_tokenized_dataset(tmp_path / "ds", list(_rows(4)), {"v": 2})
    assert len(TokenizedDataset(tmp_path / "ds")) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp or old directories left


def test_mismatched_mask_is_rejected(tmp_path):
    with pytest.raises(DataError, match="3 tokens but 2 mask values"):
        write_tokenized_dataset(tmp_path / "ds", [(1, [1, 2, 3], [0, 1])], {})
    assert not (tmp_path / "ds").exists()
