"""The reporter: everything a run tells the outside world, in one place.

metrics.jsonl (one record per step and per evaluation, rank 0), Prometheus gauges and counters
(every rank), the progress bar and TensorBoard (rank 0), and summary.json at the end. The loop
hands it numbers; it never decides anything.

Loss labels, the same everywhere (bar, log, metrics.jsonl, summary.json): `loss` is the
weighted objective the optimizer sees (for EAGLE-3, sum_k 0.8^k L_k over TTT steps);
`step_loss` is the per-position list L_k; `acc`/`cond_acc` are per-position accuracies.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.errors import ConfigError
from common.files import atomic_write_json
from common.memory import active_allocator
from draft_trainer.metrics import TrainerMetrics
from draft_trainer.model.stats import StepStats

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux VmHWM; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class RunCounters:
    """This rank's sample accounting (restored on resume, so the summary covers the whole run)."""

    samples_consumed: int = 0
    samples_truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    data_wait_s: float = 0.0
    features_cached: int = 0

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


@dataclass
class StepRecord:
    step: int
    loss: float
    stats: StepStats
    lr: float
    grad_norm: float
    tokens: int
    samples: int
    step_time_s: float
    data_wait_s: float
    sample_ids: list[int]
    cursor: tuple[int, int]


class Reporter:
    def __init__(self, out: Path, metrics: TrainerMetrics, *, is_main: bool, log_every: int, progress: bool,
                 tensorboard_dir: str = "") -> None:
        self.out = out
        self.metrics = metrics
        self.is_main = is_main
        self.log_every = log_every
        self.progress = progress and is_main
        self._f = None
        self._bar = None
        self._tb = None
        if is_main and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard_dir is set but the tensorboard package is not installed: "
                                  "pip install tensorboard") from None
            self._tb = SummaryWriter(tensorboard_dir)

    # ------------------------------------------------------------------ lifecycle
    def open(self, step: int, max_steps: int, time_budget_s: float) -> None:
        if not self.is_main:
            return
        self._f = open(self.out / "metrics.jsonl", "a")
        if not self.progress:
            return
        from tqdm import tqdm

        if time_budget_s:  # the budget, not max_steps, ends the run: show time against it
            self._bar = tqdm(total=int(time_budget_s), desc="train", unit="s", dynamic_ncols=True, mininterval=1.0,
                             bar_format="{l_bar}{bar}| {n:.0f}/{total}s [{remaining} left{postfix}]")
        else:
            self._bar = tqdm(total=max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                             mininterval=1.0)

    def close(self) -> None:
        for x in (self._bar, self._f, self._tb):
            if x is not None:
                x.close()
        self._bar = self._f = self._tb = None

    # ------------------------------------------------------------------ per step / eval
    def drop(self, reason: str) -> None:
        self.metrics.samples_dropped.labels(reason=reason).inc()

    def data_wait(self, seconds: float) -> None:
        self.metrics.data_wait_seconds.inc(seconds)

    def step(self, r: StepRecord, elapsed_s: float) -> None:
        m, st = self.metrics, r.stats
        m.steps.inc()
        m.tokens.inc(r.tokens)
        m.samples_consumed.inc(r.samples)
        m.step_seconds.observe(r.step_time_s)
        m.loss.set(r.loss)
        m.lr.set(r.lr)
        m.sim_accept_len.set(st.sim_accept_len)
        for i, (a, c) in enumerate(zip(st.acc, st.cond_acc)):
            m.accuracy.labels(position=str(i)).set(a)
            m.cond_accuracy.labels(position=str(i)).set(c)
        if self._f is None:
            return
        rec = {"step": r.step, "split": "train", "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm,
               "step_loss": st.loss, "acc": st.acc, "cond_acc": st.cond_acc, "exp_acc": st.exp_acc,
               "sim_accept_len": st.sim_accept_len, "tokens": r.tokens, "samples": r.samples,
               "step_time_s": r.step_time_s, "data_wait_s": r.data_wait_s,
               "sample_ids": r.sample_ids, "cursor": list(r.cursor)}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k in ("loss", "lr", "sim_accept_len"):
                self._tb.add_scalar(f"train/{k}", rec[k], r.step)
            for i, a in enumerate(st.acc):
                self._tb.add_scalar(f"train/acc_{i}", a, r.step)
        if self._bar is not None:
            if self._bar.unit == "s":
                self._bar.n = min(elapsed_s, self._bar.total)
            else:
                self._bar.update(1)
            self._bar.set_postfix(step=r.step, loss=f"{r.loss:.3f}", acc0=f"{st.acc[0]:.2f}",
                                  tau=f"{st.sim_accept_len:.2f}")
        elif r.step % self.log_every == 0:
            log.info("step %d loss %.4f acc0 %.3f sim_tau %.2f", r.step, r.loss, st.acc[0], st.sim_accept_len)

    def evaluation(self, step: int, loss: float, stats: StepStats) -> None:
        self.metrics.eval_sim_accept_len.set(stats.sim_accept_len)
        if not self.is_main:
            return
        rec = {"step": step, "split": "eval", "loss": loss, "step_loss": stats.loss, "acc": stats.acc,
               "cond_acc": stats.cond_acc, "exp_acc": stats.exp_acc, "sim_accept_len": stats.sim_accept_len,
               "positions": stats.positions}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        log.info("eval at step %d: loss %.4f acc0 %.3f sim_tau %.3f", step, loss, stats.acc[0], stats.sim_accept_len)

    # ------------------------------------------------------------------ the end
    def summary(self, gathered: list[dict], *, steps: int, world_size: int, samples: dict, last: StepStats | None,
                last_loss: float | None, best: float | None, ckpt: Path, wall: float, resumed_from: str, stopped: str,
                pool: dict) -> dict:
        """summary.json from every rank's counters (`gathered`: RunCounters + cursor + peak RSS)."""
        if not self.is_main:
            return {}
        dropped: dict[str, int] = {}
        for c in gathered:
            for k, v in c["dropped"].items():
                dropped[k] = dropped.get(k, 0) + v
        total = lambda key: sum(c[key] for c in gathered)  # noqa: E731
        summary = {
            "steps": steps, "world_size": world_size, "tokens": total("tokens"), **samples,
            "samples_consumed": total("samples_consumed"),
            "samples_truncated": total("samples_truncated"), "samples_dropped": dropped,
            "features_cached": total("features_cached"),
            "data_wait_s": total("data_wait_s") / len(gathered), "wall_s": wall,
            "data_wait_fraction": total("data_wait_s") / len(gathered) / max(wall, 1e-9),
            "final": None if last is None else {"loss": last_loss, "step_loss": last.loss, "acc": last.acc,
                                                "cond_acc": last.cond_acc, "sim_accept_len": last.sim_accept_len},
            "best_eval_sim_accept_len": best, "checkpoint": str(ckpt),
            "cursors": [c["cursor"] for c in gathered], "peak_rss_mb": [c["peak_rss_mb"] for c in gathered],
            "allocator": [c["allocator"] for c in gathered],
            "resumed_from": resumed_from or None,
            "stopped": stopped or None, "pool": pool,
        }
        atomic_write_json(self.out / "summary.json", summary)
        return summary


def counters_record(counters: RunCounters, cursor: tuple[int, int]) -> dict:
    return {**asdict(counters), "cursor": list(cursor), "peak_rss_mb": peak_rss_mb(), "allocator": active_allocator()}
