"""A run directory is never silently reused or left with half-written checkpoints."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from draft_trainer.train import checkpoint as ckpt_io
from draft_trainer.train.setup import refuse_existing_run


def test_a_fresh_run_into_a_directory_that_holds_one_is_refused(tmp_path):
    refuse_existing_run(tmp_path)  # empty: fine
    (tmp_path / "config.yaml").write_text("x: 1\n")
    refuse_existing_run(tmp_path)  # a config alone is not a run
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics.jsonl\).*resume_from=auto.*output_dir"):
        refuse_existing_run(tmp_path)


def test_complete_checkpoints_count_as_a_run(tmp_path):
    step = tmp_path / "checkpoints" / "step_00000003"
    step.mkdir(parents=True)
    refuse_existing_run(tmp_path)  # not complete: not a run yet
    (step / ckpt_io.COMPLETE).write_text("3")
    with pytest.raises(ConfigError, match="checkpoints/"):
        refuse_existing_run(tmp_path)


def test_unfinished_saves_are_removed_and_complete_ones_kept(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_00000009").mkdir(parents=True)
    (root / ".tmp-step_00000009" / "partial.distcp").write_bytes(b"x")
    done = root / "step_00000008"
    done.mkdir()
    (done / ckpt_io.COMPLETE).write_text("8")
    removed = ckpt_io.clean_stale_temps(root)
    assert [p.name for p in removed] == [".tmp-step_00000009"]
    assert not (root / ".tmp-step_00000009").exists() and (done / ckpt_io.COMPLETE).is_file()
