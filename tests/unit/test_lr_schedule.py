"""The two learning-rate schedules share one shape: linear warm-up, then cosine to min_lr_ratio."""

import pytest

from draft_trainer.train.schedule import cosine_lr, time_lr


def test_step_schedule_warms_up_peaks_and_ends_at_the_floor():
    lrs = [cosine_lr(s, 100, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))      # non-increasing after warm-up
    assert cosine_lr(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_time_schedule_follows_the_fraction_of_the_budget():
    budget = 1200.0
    assert time_lr(0.0, budget, 0.05, 0.0) == 0.0
    assert time_lr(30.0, budget, 0.05, 0.0) == pytest.approx(0.5)   # half-way through the warm-up
    assert time_lr(60.0, budget, 0.05, 0.0) == pytest.approx(1.0)   # peak at the end of the warm-up
    assert time_lr(630.0, budget, 0.05, 0.0) == pytest.approx(0.5)  # cosine midpoint
    assert time_lr(1200.0, budget, 0.05, 0.2) == pytest.approx(0.2)
    assert time_lr(5000.0, budget, 0.05, 0.2) == pytest.approx(0.2)  # past the budget: the floor
    # The same curve as the step schedule when steps are spread evenly over the budget.
    assert time_lr(600.0, budget, 0.0, 0.1) == pytest.approx(cosine_lr(50, 100, 0, 0.1))
