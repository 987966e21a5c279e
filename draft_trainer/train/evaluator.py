"""The held-out evaluator: loss, per-position accuracies and simulated acceptance length on the
samples SampleStream holds out, fetched once (pool or cache) and kept in memory."""

from __future__ import annotations

import logging
from collections import Counter

import torch

from draft_trainer.data.batch import Batch, collate
from draft_trainer.methods.base import DraftMethod
from draft_trainer.model.stats import SUM_KEYS, StepStats


log = logging.getLogger(__name__)


def collate_deliveries(deliveries, device) -> Batch:
    return collate([(d.sample.sample_id, d.sample.token_ids, d.sample.loss_mask) for d in deliveries],
                   [d.features for d in deliveries], device=device)


class Evaluator:
    def __init__(self, method: DraftMethod, open_stream, samples, micro_batch: int, device, all_reduce,
                 keep_best: bool, best: float | None = None, keep=None) -> None:
        self.method = method
        self.open_stream = open_stream      # samples -> deliveries (the run's pool or cache)
        self.samples = samples              # () -> this rank's held-out samples
        self.micro_batch = micro_batch
        self.device = device
        self.all_reduce = all_reduce
        self.keep_best = keep_best
        self.best = best
        self._batches: list[Batch] | None = None
        self.keep = keep                    # features -> None: a feature cache being written keeps them too
        self.dropped: Counter = Counter()   # held-out samples that could not be evaluated, by reason

    def batches(self) -> list[Batch]:
        if self._batches is not None:
            return self._batches
        stream = self.open_stream(self.samples())
        out, buf = [], []
        try:
            for d in stream:
                if d.drop_reason:
                    self.dropped[d.drop_reason] += 1
                    continue
                if self.keep is not None:   # so that an offline run evaluates on the same held-out samples
                    self.keep([d.features])
                buf.append(d)
                if len(buf) == self.micro_batch:
                    out.append(collate_deliveries(buf, self.device))
                    buf = []
            if buf:
                out.append(collate_deliveries(buf, self.device))
        finally:
            stream.close()
        if self.dropped:
            log.warning("held-out evaluation: %d sample(s) not evaluated: %s", sum(self.dropped.values()),
                        dict(self.dropped))
        self._batches = out
        return out

    @torch.no_grad()
    def evaluate(self, model) -> tuple[float, StepStats]:
        """(weighted loss, merged stats) over the held-out samples of all ranks."""
        parts = []
        for b in self.batches():
            _, stats = self.method.loss(model, b, self.method.prepare(b))
            parts.append(stats)
        if not parts:
            n = self.method.num_positions()
            parts.append(StepStats.from_sums({k: [0.0] * n for k in SUM_KEYS}))
        stats = StepStats.merged(parts, all_reduce=self.all_reduce)
        weights = self.method.loss_weights(len(stats.loss))
        return sum(w * x for w, x in zip(weights, stats.loss)), stats

    def is_best(self, stats: StepStats) -> bool:
        if self.keep_best and (self.best is None or stats.sim_accept_len > self.best):
            self.best = stats.sim_accept_len
            return True
        return False
