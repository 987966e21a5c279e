"""data.supervise: "all" trains every position of training samples; held-out samples keep the dataset's mask."""

import numpy as np
import pytest

from draft_trainer.data.dataset import TokenizedDataset, write_tokenized_dataset
from draft_trainer.train.samples import SampleStream


def _dataset(tmp_path, n=12):
    rng = np.random.default_rng(1)
    rows = []
    for sid in range(n):
        T = int(rng.integers(6, 20))
        mask = np.zeros(T, dtype=np.uint8)
        mask[T // 2:] = 1                          # the "answer" is the second half
        if sid == 3:
            mask[:] = 0                            # nothing supervised in the data
        rows.append((100 + sid, rng.integers(0, 50, T).astype(np.int32), mask))
    return TokenizedDataset(write_tokenized_dataset(tmp_path / "ds", rows, {}))


def _stream(ds, supervise):
    return SampleStream(ds, seed=0, rank=0, world=1, holdout=3, max_length=16, epochs=1, supervise=supervise)


def test_all_positions_for_training_only(tmp_path):
    ds = _dataset(tmp_path)
    base, every = _stream(ds, "assistant"), _stream(ds, "all")
    train_base, train_all = list(base.samples((0, 0), 100)), list(every.samples((0, 0), 100))
    assert [s.sample_id for s in train_base] == [s.sample_id for s in train_all]  # same order, drops included
    assert 3 in base.train_indices  # the unsupervised sample trains only with "all"
    assert {s.sample_id for s in train_base if s.drop_reason} == {103}
    assert not any(s.drop_reason for s in train_all)
    by_id = {s.sample_id: s for s in train_base if not s.drop_reason}
    for s in train_all:
        assert s.loss_mask.all() and len(s.loss_mask) == len(s.token_ids)
        if s.sample_id in by_id:
            ref = by_id[s.sample_id]
            assert ref.loss_mask.sum() < s.loss_mask.sum()
            np.testing.assert_array_equal(ref.token_ids, s.token_ids)
    ev_base, ev_all = list(base.eval_samples()), list(every.eval_samples())
    assert len(ev_base) == 3
    for a, b in zip(ev_base, ev_all):
        assert a.sample_id == b.sample_id and a.drop_reason == b.drop_reason
        if not a.drop_reason:
            np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
            assert not b.loss_mask.all()


def test_unknown_setting_refused(tmp_path):
    with pytest.raises(ValueError, match="supervise"):
        _stream(_dataset(tmp_path), "prompt")
