"""The SpecForge parity benchmark's shared pieces, without SpecForge's venv: the step plan, the
handoff file and its validation, batches equal to the trainer's own collate, the schedule each
side is handed, and the lr check that fails a run whose sides stepped differently."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.bench_parity_specforge import LR_TOLERANCE, check_lrs
from benchmarks.parity_handoff import (HandoffError, batch_at, check, load_handoff, plan_order, save_handoff,
                                       step_tokens, warmup_steps)

H, V, VD = 8, 32, 6


def _rows(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids_T": torch.randint(0, V, (n,), generator=g),
             "loss_mask_T": (torch.arange(n) >= n // 2).float(),
             "aux_T3H": torch.randn(n, 3 * H, generator=g).to(torch.bfloat16),
             "teacher_TH": torch.randn(n, H, generator=g).to(torch.bfloat16)} for n in lengths]


def _handoff(lengths=(5, 9, 3, 7, 4), tokens=60, batch_size=2, warmup=1):
    rows = _rows(lengths)
    order = plan_order(list(lengths), batch_size, tokens, seed=0)
    return dict(rows=rows, order=order, frozen={"embed_tokens": torch.randn(V, H), "lm_head": torch.randn(V, H)},
                used_Vd=torch.tensor([0, 3, 4, 10, 20, 31]), draft_config={"draft_vocab_size": VD},
                model_info={}, schedule={"lr": 1e-3, "warmup_steps": warmup, "total_steps": len(order),
                                         "grad_clip": 0.5, "weight_decay": 0.0, "ttt_steps": 3,
                                         "batch_size": batch_size, "seed": 0})


def test_plan_covers_the_tokens_with_whole_epochs_of_distinct_rows():
    lengths = [5, 9, 3, 7, 4, 6, 8]
    order = plan_order(lengths, 3, 100, seed=1)
    covered = [sum(lengths[j] for j in b) for b in order]
    assert sum(covered) >= 100 and sum(covered[:-1]) < 100         # stops at the first batch that reaches it
    flat = [j for b in order for j in b]
    per_epoch = len(lengths)
    for e in range(len(flat) // per_epoch):                        # every full epoch: each row exactly once
        assert sorted(flat[e * per_epoch:(e + 1) * per_epoch]) == list(range(per_epoch))
    assert flat[:per_epoch] != flat[per_epoch:2 * per_epoch]       # reshuffled each epoch
    assert order == plan_order(lengths, 3, 100, seed=1)            # seeded: both sides get one plan
    assert order != plan_order(lengths, 3, 100, seed=2)
    assert all(len(b) == 3 for b in order[:2])
    with pytest.raises(HandoffError, match="no training samples"):
        plan_order([], 2, 10, seed=0)
    with pytest.raises(HandoffError, match="3 held out"):
        plan_order([4, 5, 6], 2, 10, seed=0, holdout=3)


def test_held_out_rows_are_never_planned():
    lengths = [5, 9, 3, 7, 4, 6, 8]
    order = plan_order(lengths, 2, 200, seed=0, holdout=2)
    flat = [j for b in order for j in b]
    assert set(flat) == set(range(5))                              # every other row, several epochs


def test_handoff_round_trip_and_step_tokens(tmp_path):
    content = _handoff()
    path = save_handoff(tmp_path / "h.pt", **content)
    assert [p.name for p in tmp_path.iterdir()] == ["h.pt"]        # no temp file left behind
    h = load_handoff(path)
    assert h["order"] == content["order"]
    for a, b in zip(h["rows"], content["rows"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    real, sup = step_tokens(h, 0)
    rows = [content["rows"][j] for j in content["order"][0]]
    assert real == sum(r["input_ids_T"].numel() for r in rows)
    assert sup == sum(int(r["loss_mask_T"].sum()) for r in rows)


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d.update(format="other/1"), "format"),
    (lambda d: d.pop("frozen"), "missing fields"),
    (lambda d: d["schedule"].update(warmup_steps=0), "warmup_steps 0"),
    (lambda d: d["schedule"].update(total_steps=1), "total_steps 1"),
    (lambda d: d["rows"][1].update(aux_T3H=torch.zeros(9, 2 * H)), "row 1 has shapes"),
    (lambda d: d["order"][0].append(99), "out-of-range"),
    (lambda d: d.update(used_Vd=torch.tensor([0, 4, 3, 10, 20, 31])), "ascending"),
])
def test_bad_handoffs_are_refused_with_the_reason(tmp_path, breakage, message):
    content = {"format": "specrelay-parity-handoff/1", **_handoff()}
    check(dict(content))                                           # the intact one passes
    breakage(content)
    with pytest.raises(HandoffError, match=message):
        check(content)


def test_missing_handoff_file_is_a_clear_error(tmp_path):
    with pytest.raises(HandoffError, match="no handoff file"):
        load_handoff(tmp_path / "absent.pt")


def test_batches_equal_the_trainers_collate():
    """SpecRelay trains on what draft_trainer.data.batch.collate would give it for the same samples
    (right padding with zeros, masks, ids); SpecForge's collator pads the same way."""
    from common.features import SampleFeatures
    from draft_trainer.data.batch import collate

    h = {"format": "specrelay-parity-handoff/1", **_handoff()}
    for step in range(len(h["order"])):
        b = batch_at(h, step)
        rows = [(j, h["rows"][j]) for j in h["order"][step]]
        ref = collate([(j, r["input_ids_T"].numpy(), r["loss_mask_T"].numpy()) for j, r in rows],
                      [SampleFeatures(j, 0, r["input_ids_T"].numel(), r["aux_T3H"], r["teacher_TH"]) for j, r in rows],
                      dtype=torch.bfloat16)
        assert torch.equal(b["input_ids_BT"], ref.input_ids_BT)
        assert torch.equal(b["loss_mask_BT"], ref.loss_mask_BT)
        assert torch.equal(b["attention_mask_BT"], ref.attention_mask_BT)
        assert torch.equal(b["aux_BT3H"], ref.aux_BT3H) and b["aux_BT3H"].dtype == torch.bfloat16
        assert torch.equal(b["teacher_BTH"], ref.teacher_BTH)


@pytest.mark.parametrize("total", [7, 20, 23, 150, 999, 2000, 4689])
@pytest.mark.parametrize("ratio", [0.015, 0.05, 0.1])
def test_each_side_recovers_the_planned_warmup_and_lr(total, ratio):
    """The workers hand their schedulers ratio (W + 0.5) / total; SpecForge's BF16Optimizer and
    SpecRelay's LRSchedule both take int(ratio * total) (max 1 for ours): W must come back, and
    SpecRelay's per-step lr must be the plan's."""
    from draft_trainer.config import OptimConfig
    from draft_trainer.train.schedule import LRSchedule, cosine_lr

    W = warmup_steps(total, ratio)
    if W < 1:
        return  # the handoff refuses it (tested above)
    r = (W + 0.5) / total
    assert int(r * total) == W                                      # SpecForge's rounding
    sched = LRSchedule(OptimConfig(lr=2e-3, warmup_ratio=r, schedule="steps"), total, 0.0)
    assert sched.warmup == W
    plan = [2e-3 * cosine_lr(i, total, W, 0.0) for i in range(total)]
    assert [sched.lr(i, 0.0) for i in range(total)] == plan
    assert plan[W - 1] == pytest.approx(2e-3) and plan[-1] < 2e-3 * (math.pi / total) ** 2


def test_lr_check_accepts_equal_traces_and_fails_a_diverging_side():
    plan = [1e-3 * x for x in np.linspace(0.1, 1.0, 10)]
    results = {"a": {"lrs": list(plan)}, "b": {"lrs": [x * (1 + 1e-4) for x in plan]}}
    assert check_lrs(results, plan) is None
    assert results["a"]["lr_max_dev_of_peak"] == 0.0 and 0 < results["b"]["lr_max_dev_of_peak"] < LR_TOLERANCE
    off = list(plan)
    off[4] *= 1.5
    assert "b's lr differs from the plan at step 4" in check_lrs({"a": {"lrs": plan}, "b": {"lrs": off}}, plan)
    assert "ran 9 steps" in check_lrs({"a": {"lrs": plan[:-1]}}, plan)


def test_rates_by_part_split_the_steps_in_order_and_expose_a_slowdown():
    from benchmarks.parity_handoff import rates_by_part

    # 8 steps of 100 tokens: the first half at 1 CPU-s a step, the second at 2 -> the rate halves
    rates = rates_by_part([1.0] * 4 + [2.0] * 4, [100] * 8)
    assert rates == [100.0, 100.0, 50.0, 50.0]
    # uneven: 5 steps in 4 parts -> the last part takes two steps, tokens and seconds summed
    assert rates_by_part([1, 1, 1, 1, 3], [10, 20, 30, 40, 20], parts=4) == [10.0, 20.0, 30.0, 15.0]
    assert rates_by_part([1.0, 1.0], [5, 5]) == []          # fewer steps than parts: nothing to say
    with pytest.raises(ValueError, match="step times"):
        rates_by_part([1.0], [5, 5])


def test_step_meter_reports_a_step_that_faults_in_fresh_memory():
    """StepMeter's system share and fault count see a step that touches new pages (what an allocator
    that returns memory to the kernel costs every step); a step of pure arithmetic shows none of it."""
    import mmap

    import numpy as np
    import torch

    from benchmarks.parity_handoff import StepMeter

    x = torch.randn(256, 256)
    for _ in range(50):                     # warm: the first matmuls fault in the BLAS library's buffers
        x = torch.tanh(x @ x * 1e-3)
    meter = StepMeter()
    for _ in range(4):                      # arithmetic on memory already touched
        for _ in range(50):
            x = torch.tanh(x @ x * 1e-3)
        meter.step(100)
    for _ in range(4):                      # 64 MB of fresh pages a step, written and returned to the kernel
        # An anonymous mapping, not a tensor: the process's allocator may keep a freed 64 MB block
        # resident (an earlier test in this worker freed one), and then nothing faults.
        with mmap.mmap(-1, 64 << 20) as m:
            if hasattr(m, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):
                m.madvise(mmap.MADV_NOHUGEPAGE)  # 4-KiB pages even where THP is "always"
            np.frombuffer(m, dtype=np.uint8)[:] = 1
        meter.step(100)
    q = meter.by_quarter()
    assert len(q["tokens_per_cpu_s_by_quarter"]) == 4 and all(r > 0 for r in q["tokens_per_cpu_s_by_quarter"])
    faults = q["minor_faults_per_step_by_quarter"]
    assert max(faults[:2]) < 1000 < min(faults[2:]), q  # 64 MB = 16,384 4-KiB pages
    assert all(0.0 <= s <= 1.0 for s in q["sys_share_by_quarter"])
    assert sum(meter.tokens) == 800
