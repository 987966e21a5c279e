"""The training loop: dataset order -> target features -> TTT step -> optimizer, on every rank.

    summary = Trainer(cfg).run()      # one process, or every rank under torchrun

Reading order: `Trainer.setup` (process group, target pool handshake, frozen tensors, vocab
mapping, draft model, FSDP, optimizer, resume), `Trainer._train` (the loop), `train_step`
(one TTT step), `Trainer.save_checkpoint`.

Data path. The epoch order is a seeded permutation of the dataset (minus the held-out eval
samples); rank r takes every world-th sample of it, so a global step sees the same samples
whatever the world size. The dispatcher (draft_trainer/client) keeps a rank's next samples in
flight across the target pool and hands features back in that order. Each rank's position in
its order (epoch, index) is a cursor saved with every checkpoint: a restart fetches exactly
what was not trained yet. With `feature_cache.dir` the received features are also written to
disk; `feature_cache.offline` trains from that cache with no server.

Loss normalisation. Each TTT step's loss is divided by its number of supervised positions
summed over all micro-batches and ranks (one small all-reduce per step), and each rank's
backward is scaled by the world size because FSDP averages gradients. So a global batch gives
the same loss and gradient on 1 rank or N (tests/distributed/test_trainer_distributed.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.files import atomic_write_json
from common.config import dump_yaml, to_dict
from common.contract import ModelInfo
from common.errors import ConfigError, ContractError, DataError, TargetUnavailableError
from common.features import FeatureSchema
from common.metrics import serve_metrics
from common.security import read_token_file
from draft_trainer.client.dispatcher import Delivery, Dispatcher, Sample
from draft_trainer.config import TrainConfig
from draft_trainer.data.dataset import TokenizedDataset
from draft_trainer.data.feature_cache import FeatureCacheReader, FeatureCacheWriter, estimate_bytes
from draft_trainer.data.vocab import VocabMapping, build_vocab_mapping, count_supervised_tokens
from draft_trainer.metrics import TrainerMetrics
from draft_trainer.model.config import DraftConfig
from draft_trainer.model.draft import Eagle3Draft, shift_left
from draft_trainer.model.fused_loss import fused_ttt_loss, row_teacher_from_hidden, row_teacher_from_topk
from draft_trainer.model.init import init_draft
from draft_trainer.model.losses import StepStats, teacher_from_hidden, teacher_from_topk, ttt_loss
from draft_trainer.model.precision import autocast, cast_frozen, compute_dtype
from draft_trainer.train import checkpoint as ckpt_io
from draft_trainer.train.batch import Batch, collate
from draft_trainer.train.parallel import (
    DistInfo, all_reduce_sum, apply_fsdp, broadcast_tensors, destroy_distributed, init_distributed,
)

log = logging.getLogger(__name__)

EVAL_SEED = 0x5EED  # held-out samples do not depend on the run's seed: runs with different seeds compare


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


# ---------------------------------------------------------------------------------- one step
def make_teacher(batch: Batch, target_head_VH: torch.Tensor | None, used_Vd: torch.Tensor, t2d_V: torch.Tensor,
                 t2d_index_V: torch.Tensor, *, precision: str = "auto", impl: str = "fused"):
    """The step-0 teacher of a batch (no grad): rows for the fused path, dense/sparse for the reference."""
    if impl == "reference":
        if batch.teacher_BTH is not None:
            return teacher_from_hidden(batch.teacher_BTH, target_head_VH, used_Vd, t2d_V, batch.loss_mask_BT)
        return teacher_from_topk(batch.topk_ids_BTK, batch.topk_logprobs_BTK, t2d_V, t2d_index_V, batch.loss_mask_BT)
    if impl != "fused":
        raise ConfigError(f"train_step impl {impl!r}: use 'fused' or 'reference'")
    if batch.teacher_BTH is not None:
        cdt = compute_dtype(precision, batch.aux_BT3H.device)
        return row_teacher_from_hidden(batch.teacher_BTH, target_head_VH, used_Vd, t2d_V, batch.loss_mask_BT,
                                       compute_dtype=cdt)
    return row_teacher_from_topk(batch.topk_ids_BTK, batch.topk_logprobs_BTK, t2d_V, t2d_index_V, batch.loss_mask_BT)


def step_counts(teacher, ttt_steps: int) -> list[int]:
    """Supervised positions of each TTT step (the loss normalisers before summing over ranks)."""
    if hasattr(teacher, "rows_for_step"):
        return [int(teacher.rows_for_step(k)[0].numel()) for k in range(ttt_steps)]
    return [int(teacher.for_step(k).mask_BT.sum()) for k in range(ttt_steps)]


def train_step(model: Eagle3Draft, batch: Batch, target_head_VH: torch.Tensor | None, used_Vd: torch.Tensor,
               t2d_V: torch.Tensor, t2d_index_V: torch.Tensor, ttt_steps: int, *, precision: str = "auto",
               impl: str = "fused", teacher=None, normalizers: list[float] | None = None) -> tuple[torch.Tensor, StepStats]:
    """One TTT forward + loss (the caller runs backward and the optimizer).

    impl="fused" (default): fused TTT attention + chunked loss, matmuls in the `precision` dtype
    (bf16 where supported) with fp32 master weights. impl="reference": the readable reference
    (fp32), kept for equivalence tests. `normalizers` (per TTT step) replace the batch's own
    supervised-position counts, for global normalisation over micro-batches and ranks.
    """
    if teacher is None:
        teacher = make_teacher(batch, target_head_VH, used_Vd, t2d_V, t2d_index_V, precision=precision, impl=impl)
    # Step 0 at position t reads token t+1 (the target feature at t was computed reading token t).
    draft_ids_BT = shift_left(batch.input_ids_BT, 1)
    if impl == "reference":
        if normalizers is not None:
            raise ConfigError("normalizers are only supported by the fused path")
        g_steps = model(batch.aux_BT3H, draft_ids_BT, ttt_steps, batch.attention_mask_BT, impl="reference")
        return ttt_loss(model, g_steps, teacher)
    cdt = compute_dtype(precision, batch.aux_BT3H.device)
    with autocast(batch.aux_BT3H.device, cdt):
        g_steps = model(batch.aux_BT3H, draft_ids_BT, ttt_steps, batch.attention_mask_BT)
    return fused_ttt_loss(model, g_steps, teacher, compute_dtype=cdt, normalizers=normalizers)


# ---------------------------------------------------------------------------------- bookkeeping
def _peak_rss_mb() -> float:
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


class OfflineStream:
    """Deliveries from a feature cache, in the rank's order (the Dispatcher's interface)."""

    def __init__(self, reader: FeatureCacheReader, samples) -> None:
        self.reader = reader
        self.samples = samples
        self.delivered = 0
        self.missing = 0

    def __iter__(self):
        for s in self.samples:
            if s.drop_reason:
                yield Delivery(s, drop_reason=s.drop_reason)
                continue
            f = self.reader.get(s.sample_id)
            if f is None:
                self.missing += 1
                yield Delivery(s, drop_reason="not_in_cache")
            elif f.length != len(s.token_ids):
                yield Delivery(s, drop_reason="cache_length_mismatch")
            else:
                self.delivered += 1
                yield Delivery(s, features=f)

    def summary(self) -> dict:
        return {"source": f"feature cache {self.reader.path}", "delivered": self.delivered, "not_in_cache": self.missing}

    def close(self) -> None:
        pass


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.counters = RunCounters()
        self.metrics = TrainerMetrics()
        self.dist = DistInfo()
        self.step = 0
        self.cursor: tuple[int, int] = (0, 0)  # (epoch, index): the next position of this rank's order
        self.best: float | None = None
        self._stop = threading.Event()         # set by SIGTERM/SIGINT: checkpoint and exit at a step boundary
        self._stack = contextlib.ExitStack()
        self._eval_batches: list[Batch] | None = None
        self.cache_writer: FeatureCacheWriter | None = None
        self._tb = None  # TensorBoard writer (optional)

    # ================================================================== setup
    def setup(self) -> None:
        cfg = self.cfg
        self.dist = init_distributed(cfg.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self._stack.callback(destroy_distributed)
        torch.manual_seed(cfg.seed)  # the same initial draft on every rank
        self.out.mkdir(parents=True, exist_ok=True)
        self.dataset = TokenizedDataset(cfg.data.path)
        if len(self.dataset) == 0:
            raise DataError(f"dataset {cfg.data.path} has no samples")
        self._split_holdout()
        port = cfg.metrics_port + self.dist.local_rank if cfg.metrics_port > 0 else cfg.metrics_port
        self.metrics_port = serve_metrics(self.metrics.registry, cfg.metrics_host, port)

        resume = self._resolve_resume()
        state = json.loads((resume / ckpt_io.TRAINER_STATE).read_text()) if resume else None
        if state:
            self._check_resume_state(resume, state)
        if cfg.feature_cache.offline:
            self.cache_reader = FeatureCacheReader(cfg.feature_cache.dir)
            self.info = self.cache_reader.info
            frozen = self.cache_reader.frozen_tensors() if self.dist.is_main else None
            self.pool = None
        else:
            self._start_pool(resume)
            frozen = self.pool.call_any(lambda c: c.fetch_tensors(["embed_tokens", "lm_head"]), "FetchTensors") \
                if self.dist.is_main else None
        self._check_dataset_contract(self.info)
        # Rank 0 fetched the frozen target tensors once; every rank gets a copy.
        frozen = broadcast_tensors(frozen, self.dist)

        self.vocab = VocabMapping.load(resume / "vocab.json") if resume else self._vocab_mapping(self.info.vocab_size)
        self._build_model(frozen, init=not resume)
        if resume:
            st = ckpt_io.load_checkpoint(resume, self.model, self.optimizer, self.dist)
            self._restore(st)
            log.info("resumed from %s: step %d, cursor %s", resume, self.step, self.cursor)
        if cfg.feature_cache.dir and not cfg.feature_cache.offline:
            self._open_cache(frozen)
        if self.dist.is_main:
            (self.out / "config.yaml").write_text(dump_yaml(cfg))

    def _split_holdout(self) -> None:
        """Held-out eval samples: a fixed choice (EVAL_SEED), excluded from every epoch's order."""
        n = len(self.dataset)
        k = min(self.cfg.eval.holdout, n - 1)
        perm = np.random.default_rng(EVAL_SEED).permutation(n)
        self.eval_indices = np.sort(perm[:k])
        self.train_indices = np.sort(perm[k:])

    def _resolve_resume(self) -> Path | None:
        r = self.cfg.resume_from
        if not r:
            return None
        if r == "auto":
            found = ckpt_io.latest_checkpoint(self.out / "checkpoints")
            if found is None:
                log.info("resume_from=auto: no checkpoint in %s, starting fresh", self.out / "checkpoints")
            return found
        p = Path(r)
        if p.is_dir() and not (p / ckpt_io.COMPLETE).is_file() and (p / "checkpoints").is_dir():
            p = ckpt_io.latest_checkpoint(p / "checkpoints") or p  # a run directory
        if not (p / ckpt_io.COMPLETE).is_file():
            raise ConfigError(f"resume_from={r}: not a complete checkpoint (no {ckpt_io.COMPLETE} marker); point it at "
                              f"a checkpoints/step_N directory, `latest`, or use resume_from=auto")
        return p.resolve()

    def _check_resume_state(self, path: Path, state: dict) -> None:
        mine = {"seed": self.cfg.seed, "dataset_samples": len(self.dataset), "eval_holdout": len(self.eval_indices),
                "batch_size": self.cfg.batch_size, "world_size": self.dist.world_size}
        for k, v in mine.items():
            if state.get(k) != v:
                raise ConfigError(f"resume_from={path}: the checkpoint's {k} is {state.get(k)!r} but this run has {v!r}; "
                                  "the data cursors only mean something for the same sample order")

    def _start_pool(self, resume: Path | None) -> None:
        from draft_trainer.client.discovery import EndpointSource
        from draft_trainer.client.embedded import EmbeddedServer
        from draft_trainer.client.pool import TargetPool

        cfg = self.cfg
        endpoint = cfg.targets.endpoints
        if not endpoint:
            # The embedded default: rank 0 starts one local server; every rank uses it.
            if self.dist.is_main:
                server = EmbeddedServer(cfg.targets.embedded_model, dtype=cfg.targets.embedded_dtype,
                                        startup_timeout_s=cfg.targets.startup_timeout_s,
                                        log_path=self.out / "embedded_server.log",
                                        threads=cfg.targets.embedded_threads)
                endpoint = self._stack.enter_context(server)
                log.info("embedded target server at %s", endpoint)
            if self.dist.distributed:
                import torch.distributed as dist

                box = [endpoint]
                dist.broadcast_object_list(box, src=0)
                endpoint = box[0]
        expected = ModelInfo(**json.loads((resume / "model_info.json").read_text())) if resume else None
        self.pool = TargetPool(EndpointSource(endpoint), cfg.targets, metrics=self.metrics,
                               client_kwargs=self._client_kwargs(), expected=expected,
                               expected_name=f"checkpoint {resume}" if resume else "the run")
        self._stack.callback(self.pool.close)
        self.info = self.pool.start()

    def _client_kwargs(self) -> dict:
        """TargetClient arguments shared by every server of the pool (auth, TLS)."""
        t = self.cfg.targets
        return {"auth_token": read_token_file(t.auth_token_file) if t.auth_token_file else None,
                "tls_root_cert": t.tls_root_cert or None, "tls_server_name": t.tls_server_name or None}

    def _check_dataset_contract(self, info: ModelInfo) -> None:
        fp = self.dataset.tokenizer_fingerprint
        if fp and fp != info.tokenizer_fingerprint:
            raise ContractError(
                f"tokenizer mismatch: dataset {self.cfg.data.path} was tokenized with tokenizer {fp[:12]}… but the "
                f"target uses {info.tokenizer_fingerprint[:12]}…; re-run prepare-data with the served model"
            )

    def _vocab_mapping(self, vocab_size: int) -> VocabMapping:
        pinned = Path(self.cfg.data.vocab_path) if self.cfg.data.vocab_path else Path(self.cfg.data.path) / "vocab.json"
        Vd = min(self.cfg.data.draft_vocab_size, vocab_size)
        if pinned.is_file():
            m = VocabMapping.load(pinned)
            if m.vocab_size != vocab_size:
                raise ContractError(f"pinned draft vocabulary {pinned} is for V={m.vocab_size}, target has V={vocab_size}")
            return m
        ids = [self.dataset[int(i)][1] for i in self.train_indices]
        masks = [self.dataset[int(i)][2] for i in self.train_indices]
        return build_vocab_mapping(count_supervised_tokens(ids, masks, vocab_size), Vd)

    def _build_model(self, frozen: dict[str, torch.Tensor], init: bool) -> None:
        cfg = self.cfg
        dcfg = DraftConfig.from_model_info(self.info, self.vocab.draft_vocab_size)
        self.model = Eagle3Draft(dcfg).to(self.dist.device)
        with torch.no_grad():
            self.model.embed_tokens.weight.copy_(frozen["embed_tokens"].float())
        self.model.set_vocab_mapping(self.vocab.d2t, self.vocab.t2d)
        if init and cfg.model.init != "random":
            # model.init (model/init.py): rank 0 fetches the target layers once, every rank applies the same start.
            if self.pool is None:
                raise ConfigError(f"model.init={cfg.model.init} needs target servers to send the target's layers; "
                                  "an offline feature cache has none (use model.init=random, or resume)")
            fetch = lambda names: broadcast_tensors(  # noqa: E731
                self.pool.call_any(lambda c: c.fetch_tensors(names), "FetchTensors") if self.dist.is_main else None,
                self.dist)
            init_draft(self.model, cfg.model.init, self.info.num_layers, self.vocab.used, frozen["lm_head"], fetch,
                       cfg.seed)
        dev = self.dist.device
        self.target_head_VH = cast_frozen(self.model, frozen["lm_head"].float().to(dev),
                                          compute_dtype(cfg.model.precision, dev))
        self.used_Vd, self.t2d_V, self.t2d_index_V = (self.vocab.used.to(dev), self.vocab.t2d.to(dev),
                                                       self.vocab.target_to_draft.to(dev))
        if self.dist.distributed:
            apply_fsdp(self.model, [self.model.embed_tokens.weight])
        params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        # fused: one pass per parameter (~8x less optimizer time on CPU than the per-tensor loop);
        # sharded (DTensor) parameters take the foreach implementation.
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                           **({} if self.dist.distributed else {"fused": True}))
        self.warmup = max(1, int(o.warmup_ratio * cfg.max_steps))
        log.info("draft: %d trainable params, Vd=%d (coverage %.3f), K=%d, %d rank(s)", sum(p.numel() for p in params),
                 self.vocab.draft_vocab_size, self.vocab.coverage, cfg.model.ttt_steps, self.dist.world_size)

    def _open_cache(self, frozen: dict[str, torch.Tensor]) -> None:
        fc = self.cfg.feature_cache
        t = self.cfg.targets
        schema = FeatureSchema(self.info.hidden_size, self.info.dtype, t.teacher, t.topk)
        mine = self.train_indices[self.dist.rank :: self.dist.world_size]
        tokens = int(self.dataset.lengths[mine].clip(max=self.cfg.data.max_length).sum())
        est = estimate_bytes(tokens, self.info, t.teacher, t.topk)
        limit = int(fc.limit_gb * 1e9)
        log.info("feature cache %s: about %.2f GB for this rank's %d samples (one epoch); limit %s", fc.dir, est / 1e9,
                 len(mine), f"{fc.limit_gb:g} GB" if limit else "none")
        self.cache_writer = FeatureCacheWriter(fc.dir, self.info, schema, rank=self.dist.rank, limit_bytes=limit,
                                               frozen=frozen if self.dist.is_main else None)
        self._stack.callback(self.cache_writer.close)

    def _restore(self, st: dict) -> None:
        self.step = int(st["step"])
        rs = st["rank_state"] or {}
        self.cursor = tuple(rs.get("cursor", (0, 0)))
        c = rs.get("counters")
        if c:
            self.counters = RunCounters(**c)
        self.best = st.get("best")

    # ================================================================== data
    def _epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's share of the epoch's order (dataset indices)."""
        order = self.train_indices[np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.train_indices))]
        return order[self.dist.rank :: self.dist.world_size]

    def _sample(self, cursor: tuple[int, int], index: int) -> Sample:
        max_len = self.cfg.data.max_length
        sid, ids, mask = self.dataset[int(index)]
        if len(ids) < 2:
            return Sample(cursor, sid, ids, drop_reason="too_short")
        if not mask[1 : max_len].any():
            return Sample(cursor, sid, ids, drop_reason="no_supervised_tokens")
        return Sample(cursor, sid, ids[:max_len], data=(mask[:max_len], len(ids) > max_len))

    def _samples(self, start: tuple[int, int], budget: int):
        """The rank's deterministic order from `start`, at most `budget` usable samples (the
        dispatcher prefetches, and target compute past the last step would be wasted)."""
        for epoch in range(start[0], self.cfg.epochs):
            order = self._epoch_order(epoch)
            for index in range(start[1] if epoch == start[0] else 0, len(order)):
                s = self._sample((epoch, index), order[index])
                if not s.drop_reason:
                    if budget <= 0:
                        return
                    budget -= 1
                yield s

    def _open_stream(self, samples):
        if self.cfg.feature_cache.offline:
            return OfflineStream(self.cache_reader, samples)
        return Dispatcher(self.pool, samples, self.cfg.targets, self.metrics).start()

    def _next_batch(self, stream, n: int) -> tuple[Batch, tuple[int, int], float] | None:
        """The next `n` usable samples with features, in order, the cursor after them, and the
        seconds spent waiting for them."""
        got: list[Delivery] = []
        cursor = self.cursor
        t0 = time.perf_counter()
        for d in stream:
            cursor = (d.sample.cursor[0], d.sample.cursor[1] + 1)
            if d.drop_reason:
                self.counters.drop(d.drop_reason)
                self.metrics.samples_dropped.labels(reason=d.drop_reason).inc()
                continue
            got.append(d)
            if len(got) == n:
                break
        wait = time.perf_counter() - t0
        self.counters.data_wait_s += wait
        self.metrics.data_wait_seconds.inc(wait)
        if not got:
            return None
        if self.cache_writer is not None:
            for d in got:
                self.counters.features_cached += int(self.cache_writer.add([d.features]))
        self.counters.samples_truncated += sum(d.sample.data[1] for d in got)
        samples = [(d.sample.sample_id, d.sample.token_ids, d.sample.data[0]) for d in got]
        return collate(samples, [d.features for d in got]).to(self.dist.device), cursor, wait

    # ================================================================== loop
    def run(self) -> dict:
        restore = self._install_signal_handlers()
        try:
            self.setup()
            return self._loop()
        finally:
            restore()
            self._stack.close()

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum, _frame):
            if self._stop.is_set():  # a second signal: stop now
                raise KeyboardInterrupt
            log.warning("signal %d: saving a checkpoint at the end of this step, then exiting", signum)
            self._stop.set()

        for s in previous:
            signal.signal(s, handler)
        return lambda: [signal.signal(s, h) for s, h in previous.items()]

    @property
    def micro_batch(self) -> int:
        per_rank = self.cfg.batch_size // self.dist.world_size
        return max(1, per_rank // self.cfg.grad_accum)

    def _loop(self) -> dict:
        cfg = self.cfg
        if cfg.batch_size % (self.dist.world_size * cfg.grad_accum):
            raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of world size x grad_accum "
                              f"({self.dist.world_size} x {cfg.grad_accum})")
        t_start = time.perf_counter()
        # One spare batch covers samples a server rejects (dropped) without changing which samples
        # the last step gets, so a resumed run ends exactly where an uninterrupted one does.
        per_step = self.micro_batch * cfg.grad_accum
        budget = (cfg.max_steps - self.step + 1) * per_step
        stream = self._open_stream(self._samples(self.cursor, budget))
        metrics_f = open(self.out / "metrics.jsonl", "a") if self.dist.is_main else None
        stopped = ""
        last = None
        try:
            last, stopped = self._train(stream, metrics_f, t_start)
        except TargetUnavailableError as e:
            # Stop with a valid checkpoint at the last trained step; its cursor says what to fetch again.
            ckpt = self.save_checkpoint(self.step)
            self._write_summary(stream, None, ckpt, time.perf_counter() - t_start, stopped=str(e))
            raise TargetUnavailableError(f"{e}\nTraining stopped at step {self.step}; checkpoint {ckpt} "
                                         f"(cursor {self.cursor}). Resume with resume_from=auto") from None
        finally:
            if metrics_f:
                metrics_f.close()
            stream.close()
        ckpt = self._checkpoint(best=bool(cfg.eval.holdout) and stopped != "signal" and self._run_eval())
        summary = self._write_summary(stream, last, ckpt, time.perf_counter() - t_start, stopped=stopped)
        if self.dist.is_main:
            from draft_trainer.train.plots import plot_run

            plot_run(self.out)
        return summary

    def _train(self, stream, metrics_f, t_start: float) -> tuple[StepStats | None, str]:
        cfg = self.cfg
        last: StepStats | None = None
        bar = self._progress()
        if cfg.save_initial and self.step == 0:
            self.save_checkpoint(0)
        last_save = time.perf_counter()
        while self.step < cfg.max_steps:
            if self._should_stop_on_signal():
                return last, "signal"
            if cfg.time_budget_s and self._agree(time.perf_counter() - t_start > cfg.time_budget_s):
                log.info("time budget of %.0fs reached at step %d", cfg.time_budget_s, self.step)
                return last, "time_budget"
            t0 = time.perf_counter()
            micro, wait, cursor = [], 0.0, self.cursor
            for _ in range(cfg.grad_accum):
                got = self._next_batch(stream, self.micro_batch)
                if got is None:
                    break
                micro.append(got[0])
                cursor, wait = got[1], wait + got[2]
            if not self._agree(len(micro) == cfg.grad_accum, all_ranks=True):
                break  # data exhausted on some rank: stop all ranks at the same step
            if cfg.optim.schedule == "time":
                lr = cfg.optim.lr * time_lr(t0 - t_start, cfg.time_budget_s, cfg.optim.warmup_ratio,
                                            cfg.optim.min_lr_ratio)
            else:
                lr = cfg.optim.lr * cosine_lr(self.step, cfg.max_steps, self.warmup, cfg.optim.min_lr_ratio)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            # Free last step's grads before the forward: they are not needed and the forward is the peak.
            self.optimizer.zero_grad(set_to_none=True)
            loss, stats = self._forward_backward(micro)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], cfg.optim.grad_clip)
            self.optimizer.step()
            self.step += 1
            self.cursor = cursor
            n_samples = sum(len(b.sample_ids) for b in micro)
            n_tokens = sum(b.num_tokens for b in micro)
            self.counters.samples_consumed += n_samples
            self.counters.tokens += n_tokens
            last = stats
            step_time = time.perf_counter() - t0
            self._record(metrics_f, loss, stats, lr, float(grad_norm), n_tokens, n_samples, step_time, wait, micro)
            if bar is not None:
                if cfg.time_budget_s:
                    bar.n = min(time.perf_counter() - t_start, bar.total)
                else:
                    bar.update(1)
                bar.set_postfix(step=self.step, loss=f"{loss:.3f}", acc0=f"{stats.acc[0]:.2f}",
                                tau=f"{stats.sim_accept_len:.2f}")
            if (cfg.save_every and self.step % cfg.save_every == 0) or \
                    (cfg.save_every_s and self._agree(time.perf_counter() - last_save >= cfg.save_every_s)):
                self.save_checkpoint(self.step)
                last_save = time.perf_counter()
            if (cfg.eval.holdout and cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0
                    and self.step < cfg.max_steps and self._run_eval()):
                self._checkpoint(best=True)
        if bar is not None:
            bar.close()
        return last, ""

    def _agree(self, flag: bool, all_ranks: bool = False) -> bool:
        """The same decision on every rank: any rank's True (or, with all_ranks, every rank's)."""
        if not self.dist.distributed:
            return flag
        t = all_reduce_sum(torch.tensor([float(flag)]), self.dist)
        return bool(t.item() >= self.dist.world_size) if all_ranks else bool(t.item() > 0)

    def _should_stop_on_signal(self) -> bool:
        return self._agree(self._stop.is_set())

    def _forward_backward(self, micro: list[Batch]) -> tuple[float, StepStats]:
        cfg = self.cfg
        teachers = [make_teacher(b, self.target_head_VH, self.used_Vd, self.t2d_V, self.t2d_index_V,
                                 precision=cfg.model.precision) for b in micro]
        counts = torch.tensor([step_counts(t, cfg.model.ttt_steps) for t in teachers], dtype=torch.float64).sum(0)
        normalizers = all_reduce_sum(counts, self.dist).tolist()
        total = 0.0
        parts = []
        for b, t in zip(micro, teachers):
            loss, stats = train_step(self.model, b, self.target_head_VH, self.used_Vd, self.t2d_V, self.t2d_index_V,
                                     cfg.model.ttt_steps, precision=cfg.model.precision, teacher=t,
                                     normalizers=normalizers)
            # FSDP averages gradients over ranks: scale so the result is the global batch's gradient.
            (loss * self.dist.world_size).backward()
            total += float(loss.detach())
            parts.append(stats)
        global_loss = float(all_reduce_sum(torch.tensor([total], dtype=torch.float64), self.dist).item())
        merged = StepStats.merged(parts, all_reduce=lambda x: all_reduce_sum(x, self.dist))
        return global_loss, merged

    def _record(self, metrics_f, loss, stats: StepStats, lr, grad_norm, n_tokens, n_samples, step_time, wait, micro):
        m = self.metrics
        m.steps.inc()
        m.tokens.inc(n_tokens)
        m.samples_consumed.inc(n_samples)
        m.step_seconds.observe(step_time)
        m.loss.set(loss)
        m.lr.set(lr)
        m.sim_accept_len.set(stats.sim_accept_len)
        for i, (a, c) in enumerate(zip(stats.acc, stats.cond_acc)):
            m.accuracy.labels(position=str(i)).set(a)
            m.cond_accuracy.labels(position=str(i)).set(c)
        ids = [s for b in micro for s in b.sample_ids]
        if self.dist.distributed:  # the step's full sample list, for the audit trail
            import torch.distributed as dist

            per_rank: list = [None] * self.dist.world_size
            dist.all_gather_object(per_rank, ids)
            ids = [s for r in per_rank for s in r]
        if metrics_f is None:
            return
        rec = {"step": self.step, "split": "train", "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "step_loss": stats.loss, "acc": stats.acc, "cond_acc": stats.cond_acc, "exp_acc": stats.exp_acc,
               "sim_accept_len": stats.sim_accept_len, "tokens": n_tokens, "samples": n_samples,
               "step_time_s": step_time, "data_wait_s": wait,
               "sample_ids": ids, "cursor": list(self.cursor)}
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()
        if self._tb is not None:
            for k in ("loss", "lr", "sim_accept_len"):
                self._tb.add_scalar(f"train/{k}", rec[k], self.step)
            for i, a in enumerate(stats.acc):
                self._tb.add_scalar(f"train/acc_{i}", a, self.step)
        if self.step % self.cfg.log_every == 0 and not self.cfg.progress:
            log.info("step %d loss %.4f acc0 %.3f sim_tau %.2f", self.step, loss, stats.acc[0], stats.sim_accept_len)

    def _progress(self):
        if not self.dist.is_main:
            return None
        if self.cfg.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard_dir is set but the tensorboard package is not installed: "
                                  "pip install tensorboard") from None
            self._tb = SummaryWriter(self.cfg.tensorboard_dir)
            self._stack.callback(self._tb.close)
        if not self.cfg.progress:
            return None
        from tqdm import tqdm

        if self.cfg.time_budget_s:  # the budget, not max_steps, ends the run: show time against it
            return tqdm(total=int(self.cfg.time_budget_s), desc="train", unit="s", dynamic_ncols=True, mininterval=1.0,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total}s [{remaining} left{postfix}]")
        return tqdm(total=self.cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                    mininterval=1.0)

    # ================================================================== evaluation
    def _eval_stream_batches(self) -> list[Batch]:
        """Held-out batches, fetched once through the pool (or the cache) and kept in memory."""
        if self._eval_batches is not None:
            return self._eval_batches
        mine = self.eval_indices[self.dist.rank :: self.dist.world_size]
        samples = (self._sample((-1, i), idx) for i, idx in enumerate(mine))
        stream = self._open_stream(samples)
        batches = []
        try:
            it = iter(stream)
            buf: list[Delivery] = []
            for d in it:
                if d.drop_reason:
                    continue
                buf.append(d)
                if len(buf) == self.micro_batch:
                    batches.append(self._collate_eval(buf))
                    buf = []
            if buf:
                batches.append(self._collate_eval(buf))
        finally:
            stream.close()
        self._eval_batches = batches
        return batches

    def _collate_eval(self, ds: list[Delivery]) -> Batch:
        return collate([(d.sample.sample_id, d.sample.token_ids, d.sample.data[0]) for d in ds],
                       [d.features for d in ds]).to(self.dist.device)

    @torch.no_grad()
    def evaluate(self) -> StepStats:
        """Loss, accuracies and simulated acceptance length over the held-out samples (all ranks)."""
        cfg = self.cfg
        parts = []
        for b in self._eval_stream_batches():
            t = make_teacher(b, self.target_head_VH, self.used_Vd, self.t2d_V, self.t2d_index_V,
                             precision=cfg.model.precision)
            _, stats = train_step(self.model, b, self.target_head_VH, self.used_Vd, self.t2d_V, self.t2d_index_V,
                                  cfg.model.ttt_steps, precision=cfg.model.precision, teacher=t)
            parts.append(stats)
        if not parts:
            parts.append(StepStats.from_sums({k: [0.0] * cfg.model.ttt_steps for k in StepStats().sums}))
        return StepStats.merged(parts, all_reduce=lambda x: all_reduce_sum(x, self.dist))

    def _run_eval(self) -> bool:
        """Evaluate, log, and say whether this is the best held-out acceptance so far."""
        stats = self.evaluate()
        weights = [0.8 ** k for k in range(len(stats.loss))]
        loss = sum(w * x for w, x in zip(weights, stats.loss))
        self.metrics.eval_sim_accept_len.set(stats.sim_accept_len)
        if self.dist.is_main:
            rec = {"step": self.step, "split": "eval", "loss": loss, "step_loss": stats.loss, "acc": stats.acc,
                   "cond_acc": stats.cond_acc, "exp_acc": stats.exp_acc, "sim_accept_len": stats.sim_accept_len,
                   "positions": stats.positions}
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            log.info("eval at step %d: loss %.4f acc0 %.3f sim_tau %.3f", self.step, loss, stats.acc[0],
                     stats.sim_accept_len)
        if self.cfg.eval.keep_best and (self.best is None or stats.sim_accept_len > self.best):
            self.best = stats.sim_accept_len
            return True
        return False

    # ================================================================== checkpoint / summary
    def _checkpoint(self, best: bool) -> Path:
        path = self.save_checkpoint(self.step)
        if best and self.dist.is_main:
            ckpt_io.mark(self.out / "checkpoints", "best", path)
        return path

    def save_checkpoint(self, step: int) -> Path:
        """Collective (every rank): model + optimizer (DCP), RNG, cursors, vocab, contract."""
        dataset = getattr(self, "dataset", None)
        state = {"seed": self.cfg.seed, "dataset_samples": len(dataset) if dataset is not None else None,
                 "eval_holdout": len(getattr(self, "eval_indices", [])), "batch_size": self.cfg.batch_size,
                 "epochs": self.cfg.epochs, "max_steps": self.cfg.max_steps, "best": self.best}
        rank_state = {"cursor": list(self.cursor), "counters": asdict(self.counters)}
        files = {"vocab.json": self.vocab.to_json(), "draft_config.json": self.model.cfg.to_dict(),
                 "model_info.json": asdict(self.info), "config.json": to_dict(self.cfg)}
        path = ckpt_io.save_checkpoint(self.out / "checkpoints", step, self.model, self.optimizer, self.dist, state,
                                       rank_state, files, keep_last=self.cfg.keep_last)
        self.metrics.checkpoints.inc()
        return path

    def _write_summary(self, stream, last: StepStats | None, ckpt: Path, wall: float, stopped: str = "") -> dict:
        gathered = self._gather_counters()
        if not self.dist.is_main:
            return {}
        dropped: dict[str, int] = {}
        for c in gathered:
            for k, v in c["dropped"].items():
                dropped[k] = dropped.get(k, 0) + v
        total = lambda key: sum(c[key] for c in gathered)  # noqa: E731
        summary = {
            "steps": self.step, "world_size": self.dist.world_size, "tokens": total("tokens"),
            "samples_total": len(self.dataset), "samples_train": len(self.train_indices),
            "samples_heldout": len(self.eval_indices), "samples_consumed": total("samples_consumed"),
            "samples_truncated": total("samples_truncated"), "samples_dropped": dropped,
            "features_cached": total("features_cached"),
            "data_wait_s": total("data_wait_s") / len(gathered), "wall_s": wall,
            "data_wait_fraction": total("data_wait_s") / len(gathered) / max(wall, 1e-9),
            "final": None if last is None else {"loss": last.loss, "acc": last.acc, "cond_acc": last.cond_acc,
                                                "sim_accept_len": last.sim_accept_len},
            "best_eval_sim_accept_len": self.best, "checkpoint": str(ckpt),
            "cursors": [c["cursor"] for c in gathered], "peak_rss_mb": [c["peak_rss_mb"] for c in gathered],
            "resumed_from": self.cfg.resume_from or None,
            "stopped": stopped or None, "pool": stream.summary(),
        }
        atomic_write_json(self.out / "summary.json", summary)
        return summary

    def _gather_counters(self) -> list[dict]:
        mine = {**asdict(self.counters), "cursor": list(self.cursor), "peak_rss_mb": _peak_rss_mb()}
        if not self.dist.distributed:
            return [mine]
        import torch.distributed as dist

        out: list = [None] * self.dist.world_size
        dist.all_gather_object(out, mine)
        return out
