"""The sample stream: which samples a rank trains on, in which order, and where it stands.

    stream = SampleStream(dataset, seed, rank, world, holdout, max_length, epochs, supervise)
    for s in stream.samples(cursor, budget): ...      # deterministic order from a cursor
    deliveries = stream.open(samples, pool or cache)  # features for them, in that order
    ReplayStream(samples, writer, open_targets)       # online, reading back what the run cached

The epoch order is a seeded permutation of the dataset minus the held-out samples (a fixed,
seed-independent choice, so runs with different seeds compare on the same held-out set); rank
r takes every world-th sample of it, so a global step sees the same samples whatever the world
size. A rank's position in its order, (epoch, index), is the cursor saved with checkpoints: a
restart asks for exactly what was not trained yet. Samples that cannot train (too short, no
supervised token in the first max_length tokens) are delivered as drops with a reason, in order.
With supervise="all" training samples are supervised at every position; held-out samples keep the
dataset's (assistant) mask, so evaluations compare across settings.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable

import numpy as np

from draft_trainer.client.dispatcher import Delivery, Sample
from draft_trainer.data.dataset import TokenizedDataset
from draft_trainer.data.feature_cache import FeatureCacheReader, FeatureCacheWriter

log = logging.getLogger(__name__)

EVAL_SEED = 0x5EED  # held-out samples do not depend on the run's seed


class SampleStream:
    def __init__(self, dataset: TokenizedDataset, *, seed: int, rank: int, world: int, holdout: int,
                 max_length: int, epochs: int, supervise: str = "assistant") -> None:
        if supervise not in ("assistant", "all"):
            raise ValueError(f"supervise: {supervise!r} is not 'assistant' or 'all'")
        self.dataset = dataset
        self.supervise = supervise
        self.seed, self.rank, self.world = seed, rank, world
        self.max_length, self.epochs = max_length, epochs
        n = len(dataset)
        k = min(holdout, n - 1)
        perm = np.random.default_rng(EVAL_SEED).permutation(n)
        self.eval_indices = np.sort(perm[:k])
        self.train_indices = np.sort(perm[k:])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's share of the epoch's order (dataset indices)."""
        order = self.train_indices[np.random.default_rng([self.seed, epoch]).permutation(len(self.train_indices))]
        return order[self.rank :: self.world]

    def sample(self, cursor: tuple[int, int], index: int) -> Sample:
        sid, ids, mask = self.dataset[int(index)]
        if len(ids) < 2:
            return Sample(cursor, sid, ids, drop_reason="too_short")
        if self.supervise == "all" and cursor[0] >= 0:  # training only: held-out samples (epoch -1) keep the mask
            mask = np.ones_like(mask)
        if not mask[1 : self.max_length].any():
            return Sample(cursor, sid, ids, drop_reason="no_supervised_tokens")
        return Sample(cursor, sid, ids[: self.max_length], loss_mask=mask[: self.max_length],
                      truncated=len(ids) > self.max_length)

    def samples(self, start: tuple[int, int], budget: int):
        """The rank's order from `start`, at most `budget` usable samples (the dispatcher
        prefetches, and target compute past the last step would be wasted)."""
        for epoch in range(start[0], self.epochs):
            order = self.epoch_order(epoch)
            for index in range(start[1] if epoch == start[0] else 0, len(order)):
                s = self.sample((epoch, index), order[index])
                if not s.drop_reason:
                    if budget <= 0:
                        return
                    budget -= 1
                yield s

    def eval_samples(self):
        """This rank's share of the held-out samples (cursor epoch -1: never saved)."""
        mine = self.eval_indices[self.rank :: self.world]
        return (self.sample((-1, i), idx) for i, idx in enumerate(mine))

    def rank_epoch_size(self) -> int:
        """Positions in this rank's order of an epoch (usable or not)."""
        return len(self.train_indices[self.rank :: self.world])

    def usable_train_tokens(self) -> int:
        """Tokens of one epoch of this rank's share, after truncation (cache size estimate)."""
        mine = self.train_indices[self.rank :: self.world]
        return int(self.dataset.lengths[mine].clip(max=self.max_length).sum())


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


class ReplayStream:
    """Online training that reads back its own feature cache (`feature_cache.replay`).

    Each epoch's samples come from the cache when it holds them (trained in an earlier epoch of this
    run, or by an earlier run on the same dataset) and from the targets otherwise, in the rank's
    order: the targets compute a sample's features once per run instead of once per epoch. At each
    epoch's start the writer's open shard is closed and the cache re-read, and `on_source(online)`
    says whether the epoch needs the targets at all (the trainer takes the cores back while they
    idle). Features are bit-identical either way: the cache keeps what the targets sent.
    """

    def __init__(self, samples: Iterable[Sample], writer: FeatureCacheWriter,
                 open_targets: Callable[[list[Sample]], Iterable[Delivery]],
                 on_source: Callable[[bool], None] = lambda online: None) -> None:
        self.samples = samples
        self.writer = writer
        self.open_targets = open_targets
        self.on_source = on_source
        self.replayed = 0            # samples delivered from the cache
        self.requested = 0           # samples sent to the targets
        self._targets: list = []     # the targets streams opened so far (one per epoch that needed them)
        self._said: bool | None = None  # whether the last epoch logged needed the targets
        self._it = self._deliveries()

    def __iter__(self) -> "ReplayStream":
        return self                  # one iterator: the trainer takes a batch at a time

    def __next__(self) -> Delivery:
        return next(self._it)

    def _deliveries(self):
        for epoch, group in itertools.groupby(self.samples, key=lambda s: s.cursor[0]):
            todo = list(group)       # one epoch of this rank's order: ids and token views, no features
            self.writer.flush()
            reader = FeatureCacheReader(self.writer.path)
            need = [s for s in todo if not s.drop_reason and s.sample_id not in reader]
            # Said when the source changes (or the targets are needed): a 10-second epoch must not flood the log.
            log.log(logging.INFO if need or self._said != bool(need) else logging.DEBUG,
                    "epoch %d: %d sample(s) from the feature cache, %d from the targets",
                    epoch, len(todo) - len(need), len(need))
            self._said = bool(need)
            self.on_source(bool(need))
            targets = iter(())
            if need:
                self._targets.append(self.open_targets(need))
                self.requested += len(need)
                targets = iter(self._targets[-1])
            for s in todo:
                if s.drop_reason:
                    yield Delivery(s, drop_reason=s.drop_reason)
                elif s.sample_id not in reader:
                    yield next(targets)  # the targets stream delivers `need` in its order, drops included
                else:
                    f = reader.get(s.sample_id)
                    if f.length != len(s.token_ids):
                        yield Delivery(s, drop_reason="cache_length_mismatch")
                    else:
                        self.replayed += 1
                        yield Delivery(s, features=f)
            self.close()

    def summary(self) -> dict:
        return {"source": f"targets + feature cache replay {self.writer.path}", "replayed": self.replayed,
                "requested": self.requested, "targets": [t.summary() for t in self._targets]}

    def close(self) -> None:
        for t in self._targets:
            t.close()
