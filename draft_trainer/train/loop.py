"""The training loop (one rank): dataset order -> target features -> TTT step -> optimizer.

    trainer = Trainer(cfg); summary = trainer.run()

Reading order: `Trainer.setup` (handshake with the target pool, frozen tensors, vocab mapping,
draft model, optimizer, resume), then `Trainer.run` (the loop), then `train_step` (one TTT step).

Data path: `_samples` yields the rank's deterministic order from a cursor (epoch, index); the
dispatcher (draft_trainer/client) keeps the next samples in flight across the pool and hands
features back in that order; `_next_batch` takes `batch_size` of them. The cursor after the
last trained sample is saved with every checkpoint, so a restart fetches exactly what was not
trained yet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.config import dump_yaml
from common.contract import ModelInfo
from common.errors import ConfigError, ContractError, DataError, TargetUnavailableError
from common.metrics import serve_metrics
from draft_trainer.client.discovery import EndpointSource
from draft_trainer.client.dispatcher import Dispatcher, Sample
from common.security import read_token_file
from draft_trainer.client.embedded import EmbeddedServer
from draft_trainer.client.pool import TargetPool
from draft_trainer.config import TrainConfig
from draft_trainer.metrics import TrainerMetrics
from draft_trainer.data.dataset import TokenizedDataset
from draft_trainer.data.vocab import VocabMapping, build_vocab_mapping, count_supervised_tokens
from draft_trainer.model.config import DraftConfig
from draft_trainer.model.draft import Eagle3Draft, shift_left
from draft_trainer.model.fused_loss import fused_ttt_loss, row_teacher_from_hidden, row_teacher_from_topk
from draft_trainer.model.losses import StepStats, teacher_from_hidden, teacher_from_topk, ttt_loss
from draft_trainer.model.precision import autocast, cast_frozen, compute_dtype
from draft_trainer.model.ttt_fused import ttt_forward_fused
from draft_trainer.train.batch import Batch, collate

log = logging.getLogger(__name__)


def cosine_lr(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier for the base lr: linear warm-up, then cosine to `min_ratio`."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_step(model: Eagle3Draft, batch: Batch, target_head_VH: torch.Tensor | None, used_Vd: torch.Tensor,
               t2d_V: torch.Tensor, t2d_index_V: torch.Tensor, ttt_steps: int, *, precision: str = "auto",
               impl: str = "fused") -> tuple[torch.Tensor, StepStats]:
    """One TTT forward + loss (the caller runs backward and the optimizer).

    impl="fused" (default): fused TTT attention + chunked loss, matmuls in the `precision` dtype
    (bf16 where supported) with fp32 master weights. impl="reference": the readable reference
    (fp32), kept for equivalence tests.
    """
    # Step 0 at position t reads token t+1 (the target feature at t was computed reading token t).
    draft_ids_BT = shift_left(batch.input_ids_BT, 1)
    if impl == "reference":
        if batch.teacher_BTH is not None:
            teacher = teacher_from_hidden(batch.teacher_BTH, target_head_VH, used_Vd, t2d_V, batch.loss_mask_BT)
        else:
            teacher = teacher_from_topk(batch.topk_ids_BTK, batch.topk_logprobs_BTK, t2d_V, t2d_index_V,
                                        batch.loss_mask_BT)
        g_steps = model.ttt_forward(batch.aux_BT3H, draft_ids_BT, ttt_steps, batch.attention_mask_BT)
        return ttt_loss(model, g_steps, teacher)
    if impl != "fused":
        raise ConfigError(f"train_step impl {impl!r}: use 'fused' or 'reference'")
    cdt = compute_dtype(precision, batch.aux_BT3H.device)
    if batch.teacher_BTH is not None:
        rows = row_teacher_from_hidden(batch.teacher_BTH, target_head_VH, used_Vd, t2d_V, batch.loss_mask_BT,
                                       compute_dtype=cdt)
    else:
        rows = row_teacher_from_topk(batch.topk_ids_BTK, batch.topk_logprobs_BTK, t2d_V, t2d_index_V,
                                     batch.loss_mask_BT)
    with autocast(batch.aux_BT3H.device, cdt):
        g_steps = ttt_forward_fused(model, batch.aux_BT3H, draft_ids_BT, ttt_steps, batch.attention_mask_BT)
    return fused_ttt_loss(model, g_steps, rows, compute_dtype=cdt)


@dataclass
class RunCounters:
    samples_total: int = 0
    samples_consumed: int = 0
    samples_truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    data_wait_s: float = 0.0

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.counters = RunCounters()
        self.metrics = TrainerMetrics()
        self.step = 0
        self.cursor: tuple[int, int] = (0, 0)  # (epoch, index): the next position of the order to train on
        self.dataset: TokenizedDataset | None = None
        self._stack = contextlib.ExitStack()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dataset = TokenizedDataset(cfg.data.path)
        self.counters.samples_total = len(self.dataset)
        if len(self.dataset) == 0:
            raise DataError(f"dataset {cfg.data.path} has no samples")

        self.metrics_port = serve_metrics(self.metrics.registry, cfg.metrics_host, cfg.metrics_port)
        resume = self._read_resume_state() if cfg.resume_from else None

        endpoint = cfg.targets.endpoints
        if not endpoint:
            server = EmbeddedServer(cfg.targets.embedded_model, dtype=cfg.targets.embedded_dtype,
                                    startup_timeout_s=cfg.targets.startup_timeout_s,
                                    log_path=self.out / "embedded_server.log")
            endpoint = self._stack.enter_context(server)
            log.info("embedded target server at %s", endpoint)
        self.pool = TargetPool(EndpointSource(endpoint), cfg.targets, metrics=self.metrics,
                               client_kwargs=self._client_kwargs(),
                               expected=resume["model_info"] if resume else None,
                               expected_name=f"checkpoint {cfg.resume_from}" if resume else "the run")
        self._stack.callback(self.pool.close)
        self.info: ModelInfo = self.pool.start()
        self._check_dataset_contract(self.info)

        frozen = self.pool.call_any(lambda c: c.fetch_tensors(["embed_tokens", "lm_head"]), "FetchTensors")
        self.vocab = VocabMapping.load(Path(cfg.resume_from) / "vocab.json") if resume else \
            self._vocab_mapping(self.info.vocab_size)
        dcfg = DraftConfig.from_model_info(self.info, self.vocab.draft_vocab_size)
        self.model = Eagle3Draft(dcfg)
        with torch.no_grad():
            self.model.embed_tokens.weight.copy_(frozen["embed_tokens"].float())
        self.model.set_vocab_mapping(self.vocab.d2t, self.vocab.t2d)
        self.target_head_VH = cast_frozen(self.model, frozen["lm_head"].float(),
                                          compute_dtype(cfg.model.precision, "cpu"))
        self.used_Vd = self.vocab.used
        self.t2d_V = self.vocab.t2d
        self.t2d_index_V = self.vocab.target_to_draft

        params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        # fused: one pass per parameter (~8x less optimizer time on CPU than the per-tensor loop).
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                           fused=True)
        self.warmup = max(1, int(o.warmup_ratio * cfg.max_steps))
        if resume:
            self._load_resume_state(resume)
        (self.out / "config.yaml").write_text(dump_yaml(cfg))
        log.info("draft: %d trainable params, Vd=%d (coverage %.3f), K=%d", sum(p.numel() for p in params),
                 self.vocab.draft_vocab_size, self.vocab.coverage, cfg.model.ttt_steps)

    def _check_dataset_contract(self, info: ModelInfo) -> None:
        fp = self.dataset.tokenizer_fingerprint
        if fp and fp != info.tokenizer_fingerprint:
            raise ContractError(
                f"tokenizer mismatch: dataset {self.cfg.data.path} was tokenized with tokenizer {fp[:12]}… but the "
                f"target server uses {info.tokenizer_fingerprint[:12]}…; re-run prepare-data with the served model"
            )

    def _vocab_mapping(self, vocab_size: int) -> VocabMapping:
        pinned = Path(self.cfg.data.vocab_path) if self.cfg.data.vocab_path else Path(self.cfg.data.path) / "vocab.json"
        Vd = min(self.cfg.data.draft_vocab_size, vocab_size)
        if pinned.is_file():
            m = VocabMapping.load(pinned)
            if m.vocab_size != vocab_size:
                raise ContractError(f"pinned draft vocabulary {pinned} is for V={m.vocab_size}, target has V={vocab_size}")
            return m
        ids = [self.dataset[i][1] for i in range(len(self.dataset))]
        masks = [self.dataset[i][2] for i in range(len(self.dataset))]
        m = build_vocab_mapping(count_supervised_tokens(ids, masks, vocab_size), Vd)
        m.save(self.out / "vocab.json")
        return m

    # ------------------------------------------------------------------ data
    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.dataset))

    def _samples(self, start: tuple[int, int], budget: int):
        """The rank's deterministic order from `start` as dispatcher Samples (unusable ones as drops),
        at most `budget` usable ones: the dispatcher prefetches, and target compute past the last
        step would be wasted."""
        max_len = self.cfg.data.max_length
        for epoch in range(start[0], self.cfg.epochs):
            order = self._epoch_order(epoch)
            for index in range(start[1] if epoch == start[0] else 0, len(order)):
                sid, ids, mask = self.dataset[int(order[index])]
                if len(ids) < 2:
                    yield Sample((epoch, index), sid, ids, drop_reason="too_short")
                elif not mask[1:].any():
                    yield Sample((epoch, index), sid, ids, drop_reason="no_supervised_tokens")
                elif budget <= 0:
                    return
                else:
                    budget -= 1
                    truncated = len(ids) > max_len
                    yield Sample((epoch, index), sid, ids[:max_len], data=(mask[:max_len], truncated))

    def _next_batch(self, stream: Dispatcher) -> tuple[Batch, tuple[int, int], float] | None:
        """The next `batch_size` samples with features, in order, the cursor after them, and the
        seconds spent waiting for them."""
        got = []
        cursor = self.cursor
        t0 = time.perf_counter()
        for d in stream:
            cursor = (d.sample.cursor[0], d.sample.cursor[1] + 1)
            if d.drop_reason:
                self.counters.drop(d.drop_reason)
                self.metrics.samples_dropped.labels(reason=d.drop_reason).inc()
                continue
            got.append(d)
            if len(got) == self.cfg.batch_size:
                break
        wait = time.perf_counter() - t0
        self.counters.data_wait_s += wait
        self.metrics.data_wait_seconds.inc(wait)
        if not got:
            return None
        self.counters.samples_truncated += sum(d.sample.data[1] for d in got)
        samples = [(d.sample.sample_id, d.sample.token_ids, d.sample.data[0]) for d in got]
        return collate(samples, [d.features for d in got]), cursor, wait

    def _client_kwargs(self) -> dict:
        """TargetClient arguments shared by every server of the pool (auth, TLS)."""
        t = self.cfg.targets
        return {"auth_token": read_token_file(t.auth_token_file) if t.auth_token_file else None,
                "tls_root_cert": t.tls_root_cert or None, "tls_server_name": t.tls_server_name or None}

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        try:
            self.setup()
            return self._loop()
        finally:
            self._stack.close()

    def _loop(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        # One spare batch covers samples a server rejects (dropped) without changing which samples
        # the last step gets, so a resumed run ends exactly where an uninterrupted one does.
        budget = (cfg.max_steps - self.step + 1) * cfg.batch_size
        stream = Dispatcher(self.pool, self._samples(self.cursor, budget), cfg.targets, self.metrics).start()
        metrics_f = open(self.out / "metrics.jsonl", "a")
        try:
            last = self._train(stream, metrics_f)
        except TargetUnavailableError as e:
            # Stop with a valid checkpoint at the last trained step; its cursor says what to fetch again.
            ckpt = self.save_checkpoint(self.step)
            self._write_summary(stream, None, ckpt, time.perf_counter() - t_start, stopped=str(e))
            raise TargetUnavailableError(f"{e}\nTraining stopped at step {self.step}; checkpoint {ckpt} "
                                         f"(cursor {self.cursor}). Resume with resume_from={ckpt}") from None
        finally:
            metrics_f.close()
            stream.close()
        ckpt = self.save_checkpoint(self.step)
        return self._write_summary(stream, last, ckpt, time.perf_counter() - t_start)

    def _train(self, stream: Dispatcher, metrics_f) -> StepStats | None:
        cfg = self.cfg
        last: StepStats | None = None
        t_begin = time.perf_counter()
        while self.step < cfg.max_steps:
            if cfg.time_budget_s and time.perf_counter() - t_begin > cfg.time_budget_s:
                log.info("time budget of %.0fs reached at step %d", cfg.time_budget_s, self.step)
                break
            t0 = time.perf_counter()
            got = self._next_batch(stream)
            if got is None:
                break
            batch, cursor, wait = got
            step = self.step
            lr = cfg.optim.lr * cosine_lr(step, cfg.max_steps, self.warmup, cfg.optim.min_lr_ratio)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            # Free last step's grads before the forward: they are not needed and the forward is the peak.
            self.optimizer.zero_grad(set_to_none=True)
            loss, stats = train_step(self.model, batch, self.target_head_VH, self.used_Vd, self.t2d_V,
                                     self.t2d_index_V, cfg.model.ttt_steps, precision=cfg.model.precision)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], cfg.optim.grad_clip)
            self.optimizer.step()
            step += 1
            self.step, self.cursor = step, cursor
            self.counters.samples_consumed += len(batch.sample_ids)
            self.metrics.samples_consumed.inc(len(batch.sample_ids))
            self.counters.tokens += batch.num_tokens
            last = stats
            rec = {"step": step, "loss": float(loss.detach()), "lr": lr, "grad_norm": float(grad_norm), "step_loss": stats.loss, "acc": stats.acc,
                   "cond_acc": stats.cond_acc, "exp_acc": stats.exp_acc, "sim_accept_len": stats.sim_accept_len,
                   "tokens": batch.num_tokens, "samples": len(batch.sample_ids), "step_time_s": time.perf_counter() - t0,
                   "data_wait_s": wait, "sample_ids": batch.sample_ids, "cursor": list(cursor)}
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()
            if step % cfg.log_every == 0:
                log.info("step %d loss %.4f acc0 %.3f sim_tau %.2f", step, rec["loss"], stats.acc[0],
                         stats.sim_accept_len)
            if cfg.save_every and step % cfg.save_every == 0:
                self.save_checkpoint(step)
        return last

    def _write_summary(self, stream: Dispatcher, last: StepStats | None, ckpt: Path, wall: float,
                       stopped: str = "") -> dict:
        c = self.counters
        summary = {
            "steps": self.step, "tokens": c.tokens, "samples_total": c.samples_total,
            "samples_consumed": c.samples_consumed, "samples_truncated": c.samples_truncated,
            "samples_dropped": c.dropped, "data_wait_s": c.data_wait_s, "wall_s": wall,
            "data_wait_fraction": c.data_wait_s / max(wall, 1e-9),
            "final": None if last is None else {"loss": last.loss, "acc": last.acc, "cond_acc": last.cond_acc,
                                                "sim_accept_len": last.sim_accept_len},
            "checkpoint": str(ckpt), "cursor": {"epoch": self.cursor[0], "index": self.cursor[1]},
            "resumed_from": self.cfg.resume_from or None, "stopped": stopped or None,
            "pool": stream.summary(),
        }
        tmp = self.out / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, self.out / "summary.json")
        return summary

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(self, step: int) -> Path:
        """Atomic: written to a temporary directory, then renamed to checkpoints/step_N."""
        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step_{step:08d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        state = {k: v for k, v in self.model.state_dict().items() if not k.startswith(("embed_tokens", "rotary"))}
        torch.save(state, tmp / "draft.pt")
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "draft_config.json").write_text(json.dumps(self.model.cfg.to_dict(), indent=1))
        (tmp / "model_info.json").write_text(json.dumps({k: v for k, v in vars(self.info).items()}, indent=1))
        self.vocab.save(tmp / "vocab.json")
        (tmp / "trainer_state.json").write_text(json.dumps({
            "step": step, "cursor": {"epoch": self.cursor[0], "index": self.cursor[1]}, "seed": self.cfg.seed,
            "epochs": self.cfg.epochs, "dataset_samples": None if self.dataset is None else len(self.dataset)}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest = root / "latest"
        tmp_link = root / ".latest.tmp"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(final.name)
        os.replace(tmp_link, latest)
        return final

    # ------------------------------------------------------------------ resume
    def _read_resume_state(self) -> dict:
        """trainer_state.json + model_info.json of `resume_from`, checked against this run's order."""
        ckpt = Path(self.cfg.resume_from)
        state_f = ckpt / "trainer_state.json"
        if not state_f.is_file():
            raise ConfigError(f"resume_from={ckpt}: no trainer_state.json there; point it at a checkpoint directory "
                              f"such as {self.out / 'checkpoints' / 'latest'}")
        state = json.loads(state_f.read_text())
        if "cursor" not in state:
            raise ConfigError(f"resume_from={ckpt}: checkpoint has no data cursor (written by an older trainer)")
        mine = {"seed": self.cfg.seed, "dataset_samples": len(self.dataset)}
        for k, v in mine.items():
            if state.get(k) != v:
                raise ConfigError(f"resume_from={ckpt}: the checkpoint's {k} is {state.get(k)!r} but this run has "
                                  f"{v!r}; the data cursor only means something for the same sample order")
        state["model_info"] = ModelInfo(**json.loads((ckpt / "model_info.json").read_text()))
        return state

    def _load_resume_state(self, state: dict) -> None:
        ckpt = Path(self.cfg.resume_from)
        missing, unexpected = self.model.load_state_dict(torch.load(ckpt / "draft.pt"), strict=False)
        missing = [k for k in missing if not k.startswith(("embed_tokens", "rotary"))]
        if missing or unexpected:
            raise ContractError(f"resume_from={ckpt}: draft.pt does not fit this draft (missing {missing}, "
                                f"unexpected {unexpected})")
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt"))
        self.step = int(state["step"])
        self.cursor = (int(state["cursor"]["epoch"]), int(state["cursor"]["index"]))
        log.info("resumed from %s: step %d, cursor %s", ckpt, self.step, self.cursor)
