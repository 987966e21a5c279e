"""The training loop: sample order -> target features -> the method's loss -> optimizer, on every rank.

    summary = Trainer(cfg).run()      # one process, or every rank under torchrun

The Trainer composes small objects with one job each and owns only the loop's state (step,
cursor, counters): `build_run` (train/setup.py: pool, contract checks, vocabulary, the method's
model, FSDP2, optimizer, resume), `SampleStream` (train/samples.py: order, holdout, cursor,
drops, online/offline), the draft method (draft_trainer/methods: features, model, loss, export),
`LRSchedule` (train/schedule.py), `Evaluator` (train/evaluator.py), `Reporter`
(train/reporter.py: metrics.jsonl, Prometheus, progress, TensorBoard, summary) and the
checkpoint writer (train/checkpoint.py).

Loss normalisation. Each loss term (a TTT step for EAGLE-3) is divided by its number of
supervised positions summed over all micro-batches and ranks (one small all-reduce per step),
and each rank's backward is scaled by the world size because FSDP averages gradients. So a
global batch gives the same loss and gradient on 1 rank or N (tests/distributed).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

from common.config import dump_yaml, to_dict
from common.errors import ConfigError, TargetUnavailableError
from common.metrics import serve_metrics
from draft_trainer.client.dispatcher import Dispatcher
from draft_trainer.config import TrainConfig
from draft_trainer.data.batch import Batch
from draft_trainer.metrics import TrainerMetrics
from draft_trainer.model.stats import StepStats
from draft_trainer.train import checkpoint as ckpt_io
from draft_trainer.train.evaluator import Evaluator, collate_deliveries
from draft_trainer.train.parallel import (DistInfo, all_reduce, destroy_distributed,
                                          init_distributed)
from draft_trainer.train.reporter import Reporter, RunCounters, StepRecord, counters_record
from draft_trainer.train.samples import OfflineStream, ReplayStream
from draft_trainer.train.schedule import LRSchedule
from draft_trainer.train.setup import Run, build_run

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.metrics = TrainerMetrics()
        self.counters = RunCounters()
        self.dist = DistInfo()
        self.step = 0
        self.cursor: tuple[int, int] = (0, 0)  # (epoch, index): the next position of this rank's order
        # Training seconds of the whole run, across resumes: the time budget and optim.schedule=time
        # count them, so a resumed run continues its schedule and stops where the budget says.
        self.spent_s = 0.0
        self._t_start: float | None = None     # perf_counter() at which this run's clock reads 0
        self.run_: Run | None = None
        self._stop = threading.Event()         # set by SIGTERM/SIGINT: checkpoint and exit at a step boundary
        self._stack = contextlib.ExitStack()

    # ================================================================== setup
    def setup(self) -> None:
        cfg = self.cfg
        self.dist = init_distributed(cfg.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self._threads = torch.get_num_threads()
        self._stack.callback(destroy_distributed)
        port = cfg.metrics_port + self.dist.local_rank if cfg.metrics_port > 0 else cfg.metrics_port
        self.metrics_port = serve_metrics(self.metrics.registry, cfg.metrics_host, port)
        run = self.run_ = build_run(cfg, self.dist, self._stack, self.metrics, stop=self._stop)
        best = None
        if run.restored:
            st = run.restored
            self.step = int(st["step"])
            rs = st["rank_state"] or {}
            self.cursor = tuple(rs.get("cursor", (0, 0)))
            if rs.get("counters"):
                self.counters = RunCounters(**rs["counters"])
            best = st.get("best")
            self.spent_s = float(st.get("train_s", 0.0))
            log.info("resumed from %s: step %d, cursor %s, %.0f s of training spent", run.resume, self.step,
                     self.cursor, self.spent_s)
        self.schedule = LRSchedule(cfg.optim, cfg.max_steps, cfg.time_budget_s)
        self.evaluator = Evaluator(run.method, self._open_stream, run.stream.eval_samples, self.micro_batch,
                                   self.dist.device, lambda x: all_reduce(x, self.dist), cfg.eval.keep_best, best,
                                   keep=run.cache_writer.add if run.cache_writer is not None else None)
        self.reporter = Reporter(self.out, self.metrics, is_main=self.dist.is_main, log_every=cfg.log_every,
                                 progress=cfg.progress, tensorboard_dir=cfg.tensorboard_dir)
        self._stack.callback(self.reporter.close)
        if self.dist.is_main:
            (self.out / "config.yaml").write_text(dump_yaml(cfg))

    @property
    def eval_indices(self):
        return self.run_.stream.eval_indices

    @property
    def micro_batch(self) -> int:
        per_rank = self.cfg.batch_size // self.dist.world_size
        return max(1, per_rank // self.cfg.grad_accum)

    def _open_stream(self, samples):
        run = self.run_
        if run.cache_reader is not None:
            return OfflineStream(run.cache_reader, samples)
        return Dispatcher(run.pool, samples, self.cfg.targets, self.metrics, spec=run.spec).start()

    def _use_cores(self, targets_busy: bool) -> None:
        """Replay: while an epoch needs no target, the trainer may use the cores an embedded server shared."""
        n = self.cfg.feature_cache.replay_threads if not targets_busy else 0
        n = n or self._threads
        if n != torch.get_num_threads():
            log.info("%s: %d torch thread(s)", "targets in use" if targets_busy else "epoch read from the feature cache", n)
            torch.set_num_threads(n)

    # ================================================================== run
    def run(self) -> dict:
        restore = self._install_signal_handlers()
        try:
            self.setup()
            return self._run()
        finally:
            restore()
            self._stack.close()

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum, _frame):
            if self._stop.is_set() or self.run_ is None:
                # A second signal, or one before training started (waiting for servers, loading):
                # stop now; the last complete checkpoint stays as it is.
                self._stop.set()
                raise KeyboardInterrupt
            log.warning("signal %d: saving a checkpoint at the end of this step, then exiting "
                        "(a second signal stops at once, keeping the last complete checkpoint)", signum)
            self._stop.set()

        for s in previous:
            signal.signal(s, handler)
        return lambda: [signal.signal(s, h) for s, h in previous.items()]

    def _run(self) -> dict:
        cfg = self.cfg
        if cfg.batch_size % (self.dist.world_size * cfg.grad_accum):
            raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of world size x grad_accum "
                              f"({self.dist.world_size} x {cfg.grad_accum})")
        t_start = self._t_start = time.perf_counter() - self.spent_s
        if cfg.time_budget_s and self.spent_s:
            log.info("time budget: %.0f s of %.0f s spent before this resume", self.spent_s, cfg.time_budget_s)
        # One spare batch covers samples a server rejects (dropped) without changing which samples
        # the last step gets, so a resumed run ends exactly where an uninterrupted one does.
        budget = (cfg.max_steps - self.step + 1) * self.micro_batch * cfg.grad_accum
        samples = self.run_.stream.samples(self.cursor, budget)
        if cfg.feature_cache.replay:
            stream = ReplayStream(samples, self.run_.cache_writer, self._open_stream, self._use_cores)
        else:
            stream = self._open_stream(samples)
        self.reporter.open(self.step, cfg.max_steps, cfg.time_budget_s)
        stopped, last = "", None
        try:
            last, stopped = self._train(stream, t_start)
        except TargetUnavailableError as e:
            # Stop with a valid checkpoint at the last trained step; its cursor says what to fetch again.
            ckpt = self.save_checkpoint(self.step)
            self._summary(stream, None, ckpt, stopped=str(e))
            raise TargetUnavailableError(f"{e}\nTraining stopped at step {self.step}; checkpoint {ckpt} "
                                         f"(cursor {self.cursor}). Resume with resume_from=auto") from None
        finally:
            self.reporter.close()
            stream.close()
        best = bool(cfg.eval.holdout) and stopped != "signal" and self._run_eval()
        ckpt = self._checkpoint(best=best)
        summary = self._summary(stream, last, ckpt, stopped=stopped)
        if self.dist.is_main:
            from draft_trainer.train.plots import plot_run

            plot_run(self.out)
        return summary

    def _train(self, stream, t_start: float) -> tuple[StepStats | None, str]:
        cfg = self.cfg
        last: StepStats | None = None
        self.last_loss: float | None = None
        if cfg.save_initial and self.step == 0:
            self.save_checkpoint(0)
        # Timed checkpoints fall on multiples of save_every_s of the run's clock, so a resumed run
        # saves at the same run-minutes as an uninterrupted one.
        next_save_s = _next_multiple(self.spent_s, cfg.save_every_s)
        saved_at = self.step   # the starting state is a checkpoint already (resumed, or step 0), or nothing new
        while self.step < cfg.max_steps:
            # One agreed clock a step decides the stop, the budget, the timed save of the steps so far
            # and the time-laid lr: the same on every rank, in one collective.
            stop, run_s = self._agreed_clock(t_start)
            if stop:
                return last, "signal"
            if cfg.time_budget_s and run_s > cfg.time_budget_s:
                log.info("time budget of %.0fs reached at step %d", cfg.time_budget_s, self.step)
                return last, "time_budget"
            if run_s >= next_save_s and self.step > saved_at:
                self.save_checkpoint(self.step)
                saved_at, next_save_s = self.step, _next_multiple(run_s, cfg.save_every_s)
            t0 = time.perf_counter()
            micro, wait, cursor = [], 0.0, self.cursor
            for _ in range(cfg.grad_accum):
                got = self._next_batch(stream, self.micro_batch)
                if got is None:
                    break
                micro.append(got[0])
                cursor, wait = got[1], wait + got[2]
            if not self._agree(len(micro) == cfg.grad_accum, all_ranks=True):
                log.info("stopping at step %d of %d: the data ran out (%d epoch(s))", self.step, cfg.max_steps,
                         cfg.epochs)
                return last, "data_exhausted"
            lr = self.schedule.lr(self.step, run_s)
            for g in self.run_.optimizer.param_groups:
                g["lr"] = lr
            # Free last step's grads before the forward: they are not needed and the forward is the peak.
            self.run_.optimizer.zero_grad(set_to_none=True)
            loss, stats = self._forward_backward(micro)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.run_.model.parameters() if p.requires_grad], cfg.optim.grad_clip)
            self.run_.optimizer.step()
            self.step += 1
            self.cursor = cursor
            n_samples = sum(len(b.sample_ids) for b in micro)
            n_tokens = sum(b.num_tokens for b in micro)
            self.counters.samples_consumed += n_samples
            self.counters.tokens += n_tokens
            last, self.last_loss = stats, loss
            self.reporter.step(StepRecord(self.step, loss, stats, lr, float(grad_norm), n_tokens, n_samples,
                                          time.perf_counter() - t0, wait, self._step_sample_ids(micro), self.cursor),
                               elapsed_s=time.perf_counter() - t_start)
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint(self.step)
                saved_at = self.step
            if (cfg.eval.holdout and cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0
                    and self.step < cfg.max_steps and self._run_eval()):
                self._checkpoint(best=True)
        return last, "max_steps"

    def _next_batch(self, stream, n: int) -> tuple[Batch, tuple[int, int], float] | None:
        """The next `n` usable samples with features, in order, the cursor after them, and the
        seconds spent waiting for them."""
        got = []
        cursor = self.cursor
        t0 = time.perf_counter()
        for d in stream:
            cursor = (d.sample.cursor[0], d.sample.cursor[1] + 1)
            if d.drop_reason:
                self.counters.drop(d.drop_reason)
                self.reporter.drop(d.drop_reason)
                continue
            got.append(d)
            if len(got) == n:
                break
        wait = time.perf_counter() - t0
        self.counters.data_wait_s += wait
        self.reporter.data_wait(wait)
        if not got:
            return None
        writer = self.run_.cache_writer
        if writer is not None:
            for d in got:
                self.counters.features_cached += int(writer.add([d.features]))
            if self.cfg.feature_cache.replay and cursor[1] >= self.run_.stream.rank_epoch_size():
                # This rank's epoch ends with this batch: make it readable now, before the step's
                # collectives, so that other ranks starting the next epoch after them see it.
                writer.flush()
        self.counters.samples_truncated += sum(d.sample.truncated for d in got)
        return collate_deliveries(got, self.dist.device), cursor, wait

    def _forward_backward(self, micro: list[Batch]) -> tuple[float, StepStats]:
        method, model = self.run_.method, self.run_.model
        targets = [method.prepare(b) for b in micro]
        counts = torch.tensor([method.loss_counts(t) for t in targets], dtype=torch.float64).sum(0)
        normalizers = all_reduce(counts, self.dist).tolist()
        total, parts = 0.0, []
        for b, t in zip(micro, targets):
            loss, stats = method.loss(model, b, t, normalizers=normalizers)
            # FSDP averages gradients over ranks: scale so the result is the global batch's gradient.
            (loss * self.dist.world_size).backward()
            total += float(loss.detach())
            parts.append(stats)
        global_loss = float(all_reduce(torch.tensor([total], dtype=torch.float64), self.dist).item())
        merged = StepStats.merged(parts, all_reduce=lambda x: all_reduce(x, self.dist))
        return global_loss, merged

    def _step_sample_ids(self, micro: list[Batch]) -> list[int]:
        """The step's full sample list over all ranks, for the audit trail in metrics.jsonl."""
        ids = [s for b in micro for s in b.sample_ids]
        if self.dist.distributed:
            import torch.distributed as dist

            per_rank: list = [None] * self.dist.world_size
            dist.all_gather_object(per_rank, ids)
            ids = [s for r in per_rank for s in r]
        return ids

    def _agreed_clock(self, t_start: float) -> tuple[bool, float]:
        """(a stop was asked on any rank, the run's training seconds), agreed by every rank in one
        collective: the clock is the latest rank's (a resume starts at the recorded `train_s`), so that
        all ranks stop, spend the time budget, lay a time-laid learning rate and save timed checkpoints
        alike, to the last bit."""
        stop, run_s = self._stop.is_set(), time.perf_counter() - t_start
        if not self.dist.distributed:
            return stop, run_s
        both = all_reduce(torch.tensor([float(stop), run_s], dtype=torch.float64), self.dist, "max")
        return bool(both[0].item()), float(both[1].item())

    def _agree(self, flag: bool, all_ranks: bool = False) -> bool:
        """The same decision on every rank: any rank's True (or, with all_ranks, every rank's)."""
        if not self.dist.distributed:
            return flag
        return bool(all_reduce(torch.tensor([float(flag)]), self.dist, "min" if all_ranks else "max").item())

    def _run_eval(self) -> bool:
        """Evaluate, report, and say whether this is the best held-out acceptance so far."""
        loss, stats = self.evaluator.evaluate(self.run_.model)
        self.reporter.evaluation(self.step, loss, stats)
        return self.evaluator.is_best(stats)

    # ================================================================== checkpoint / summary
    def _checkpoint(self, best: bool) -> Path:
        path = self.save_checkpoint(self.step)
        if best and self.dist.is_main:
            ckpt_io.mark(self.out / "checkpoints", "best", path)
        return path

    def save_checkpoint(self, step: int) -> Path:
        """Collective (every rank): model + optimizer (DCP), RNG, cursors, vocab, contract."""
        # the agreed clock (the latest rank's), which stopped the run: a resume must find the budget spent as
        # the run that stopped on it did (rank 0's own clock can be behind it)
        spent = self._agreed_clock(self._t_start)[1] if self._t_start is not None else self.spent_s
        path = save_run_checkpoint(self.cfg, self.run_, self.dist, step, self.cursor, self.counters, self.evaluator.best,
                                   spent)
        self.metrics.checkpoints.inc()
        return path

    def _summary(self, stream, last: StepStats | None, ckpt: Path, stopped: str = "") -> dict:
        """Collective (every rank). wall_s is the agreed clock that ended the run, as the checkpoint's train_s."""
        wall = self._agreed_clock(self._t_start)[1]
        mine = counters_record(self.counters, self.cursor)
        gathered = [mine]
        if self.dist.distributed:
            import torch.distributed as dist

            gathered = [None] * self.dist.world_size
            dist.all_gather_object(gathered, mine)
        s = self.run_.stream
        samples = {"samples_total": len(self.run_.dataset), "samples_train": len(s.train_indices),
                   "samples_heldout": len(s.eval_indices)}
        return self.reporter.summary(gathered, steps=self.step, world_size=self.dist.world_size, samples=samples,
                                     last=last, last_loss=getattr(self, "last_loss", None), best=self.evaluator.best,
                                     ckpt=ckpt, wall=wall,
                                     resumed_from=self.cfg.resume_from, stopped=stopped, pool=stream.summary())


def save_run_checkpoint(cfg: TrainConfig, run: Run, dist: DistInfo, step: int, cursor: tuple[int, int],
                        counters: RunCounters, best: float | None, train_s: float = 0.0) -> Path:
    """A run's checkpoint: the method's model + optimizer, the trainer state that resume checks
    (and `train_s`, the run's training seconds so far), this rank's cursor and counters, and the
    files export and eval read (vocab, draft config, the target contract, the run config)."""
    state = {"seed": cfg.seed, "dataset_samples": len(run.dataset), "eval_holdout": len(run.stream.eval_indices),
             "batch_size": cfg.batch_size, "epochs": cfg.epochs, "max_steps": cfg.max_steps, "best": best,
             "method": run.method.name, "train_s": round(train_s, 3)}
    rank_state = {"cursor": list(cursor), "counters": asdict(counters)}
    files = {"vocab.json": run.vocab.to_json(), "draft_config.json": run.method.draft_config(run.model),
             "model_info.json": asdict(run.info), "config.json": to_dict(cfg)}
    return ckpt_io.save_checkpoint(Path(cfg.output_dir) / "checkpoints", step, run.model, run.optimizer, dist, state,
                                   rank_state, files, keep_last=cfg.keep_last)


def _next_multiple(run_s: float, every_s: float) -> float:
    """The first multiple of `every_s` after `run_s` (inf when timed saves are off)."""
    return (run_s // every_s + 1) * every_s if every_s else float("inf")
