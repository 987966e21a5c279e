"""A time-budgeted run that is stopped and resumed continues its budget and its schedule.

`time_budget_s` and `optim.schedule=time` count the run's training seconds, which every checkpoint
records (`train_s` in trainer.json). A resumed run starts its clock there: the learning rate
continues where the cosine was (it does not warm up again) and the run stops once the whole run,
not this invocation, has trained for the budget. Before this, a resume restarted both: a run
stopped after 1 hour of a 3-hour budget trained 3 more hours, warming up from zero again.

The checkpoint's recorded time is set by hand below (500 s, then the whole budget) so that the test
needs seconds, not minutes; that the trainer writes a true value is checked first. Last, a resume whose
settings would build another draft than the checkpoint's is refused up front (train/setup.py
`check_resume_model`)."""

from __future__ import annotations

import json
import time

from draft_trainer.train import checkpoint as ckpt_io
from draft_trainer.train.schedule import time_lr
from tests.integration.test_feature_replay import _train

BUDGET_S, LR, WARMUP = 1000.0, 1e-3, 0.05


def _records(out) -> list[dict]:
    return [r for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip())
            if r["split"] == "train"]


def _set_spent(out, seconds: float) -> None:
    path = ckpt_io.list_checkpoints(out / "checkpoints")[-1] / ckpt_io.TRAINER_STATE
    state = json.loads(path.read_text())
    state["train_s"] = seconds
    path.write_text(json.dumps(state))


def test_a_resumed_run_continues_its_time_budget_and_schedule(exact_tiny_server, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    common = (f"time_budget_s={BUDGET_S}", "optim.schedule=time", f"optim.lr={LR}", f"optim.warmup_ratio={WARMUP}",
              "save_every=1")
    t0 = time.monotonic()
    _train(tiny_dataset, out, exact_tiny_server, *common, "max_steps=2")
    wall = time.monotonic() - t0
    state = json.loads((ckpt_io.list_checkpoints(out / "checkpoints")[-1] / ckpt_io.TRAINER_STATE).read_text())
    assert state["step"] == 2 and 0 < state["train_s"] < wall          # the trainer records its own clock

    # as if the first part had trained 500 s: the resumed step's lr is the cosine's at ~50%, not a warm-up's
    _set_spent(out, 500.0)
    _train(tiny_dataset, out, exact_tiny_server, *common, "max_steps=3", "resume_from=auto")
    rec = _records(out)[-1]
    assert rec["step"] == 3
    hi, lo = LR * time_lr(500.0, BUDGET_S, WARMUP, 0.0), LR * time_lr(560.0, BUDGET_S, WARMUP, 0.0)
    assert lo <= rec["lr"] <= hi, (rec["lr"], lo, hi)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_s"] >= 500.0 and summary["stopped"] == "max_steps"

    # the whole budget spent: a resume stops at once, with no step trained, however many steps remain
    _set_spent(out, BUDGET_S)
    _train(tiny_dataset, out, exact_tiny_server, *common, "max_steps=6", "resume_from=auto")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "time_budget" and summary["steps"] == 3
    assert [r["step"] for r in _records(out)] == [1, 2, 3]


def test_timed_checkpoints_fall_on_the_run_clock(exact_tiny_server, tiny_dataset, tmp_path):
    """`save_every_s` counts the run's clock, not the process's: a run resumed just before a
    multiple of it checkpoints after its first step, then not again until the next multiple.
    (Before, a resume waited another whole `save_every_s`, so a stopped and resumed run's
    checkpoints fell at other run-minutes than an uninterrupted run's.)"""
    out = tmp_path / "run"
    _train(tiny_dataset, out, exact_tiny_server, "max_steps=1")
    _set_spent(out, 599.999)
    _train(tiny_dataset, out, exact_tiny_server, "save_every_s=300", "max_steps=4", "resume_from=auto")
    steps = [int(p.name.rsplit("_", 1)[1]) for p in ckpt_io.list_checkpoints(out / "checkpoints")]
    # 2: the run clock passed 600 s during step 2; 3: the next multiple is 900 s; 4: the run's end
    assert steps == [1, 2, 4], steps


def test_a_resume_that_would_build_another_draft_is_refused_with_the_settings_to_use(exact_tiny_server, tiny_dataset,
                                                                                    tmp_path):
    """A run trained as plain EAGLE-3, resumed where the recipe now says EAGLE-3.1 (the demo's recipe changed
    that way): refused before training, naming the setting to resume with; then resumed with it."""
    out = tmp_path / "run"
    _train(tiny_dataset, out, exact_tiny_server, "model.eagle_variant=3", "max_steps=1")
    res = _train(tiny_dataset, out, exact_tiny_server, "model.eagle_variant=3.1", "max_steps=2", "resume_from=auto",
                 ok=False)
    assert res.returncode != 0
    assert "fc_norm: False there, True here" in res.stderr and "resume with model.eagle_variant=3" in res.stderr
    assert len(_records(out)) == 1                                  # nothing trained by the refused resume
    _train(tiny_dataset, out, exact_tiny_server, "model.eagle_variant=3", "max_steps=2", "resume_from=auto")
    assert [r["step"] for r in _records(out)] == [1, 2]
