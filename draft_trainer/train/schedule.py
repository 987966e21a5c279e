"""Learning-rate schedules: linear warm-up then a cosine tail, over steps or over a time budget."""

from __future__ import annotations

import math

from common.errors import ConfigError


def _cosine_tail(progress: float, min_ratio: float) -> float:
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def cosine_lr(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier for the base lr: linear warm-up, then cosine to `min_ratio`."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return _cosine_tail((step - warmup) / max(1, total - warmup), min_ratio)


def time_lr(elapsed_s: float, budget_s: float, warmup_ratio: float, min_ratio: float) -> float:
    """Multiplier for optim.schedule=time: the same shape laid over the fraction of the time budget used."""
    p = min(1.0, elapsed_s / budget_s)
    if p < warmup_ratio:
        return p / warmup_ratio
    return _cosine_tail((p - warmup_ratio) / max(1e-9, 1 - warmup_ratio), min_ratio)


class LRSchedule:
    """The learning rate of a step, from the run's `optim` section (schedule=steps|time)."""

    def __init__(self, optim_cfg, max_steps: int, time_budget_s: float) -> None:
        if optim_cfg.schedule not in ("steps", "time"):
            raise ConfigError(f"optim.schedule={optim_cfg.schedule!r}: use steps or time")
        self.cfg = optim_cfg
        self.max_steps = max_steps
        self.budget_s = time_budget_s
        self.warmup = max(1, int(optim_cfg.warmup_ratio * max_steps))

    def lr(self, step: int, elapsed_s: float) -> float:
        o = self.cfg
        if o.schedule == "time":
            return o.lr * time_lr(elapsed_s, self.budget_s, o.warmup_ratio, o.min_lr_ratio)
        return o.lr * cosine_lr(step, self.max_steps, self.warmup, o.min_lr_ratio)
