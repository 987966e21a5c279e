"""Shared pieces of the pool tests: synthetic servers, a sample source, an order/feature checker."""

from __future__ import annotations

import threading

import numpy as np
import torch

from draft_trainer.client.discovery import EndpointSource
from draft_trainer.client.dispatcher import Delivery, Dispatcher, Sample
from draft_trainer.client.pool import TargetPool
from draft_trainer.config import TargetsConfig
from target_server.backends.synthetic import SyntheticBackend

H = 16
SYN = ["--backend", "synthetic", "--synthetic-hidden-size", str(H), "--dtype", "fp32"]


def syn(cost_us: float = 0.0, *extra: str) -> list[str]:
    return [*SYN, "--synthetic-cost-per-token-us", str(cost_us), *extra]


def targets(endpoints: str, **kw) -> TargetsConfig:
    """Small windows and fast probes, so a few hundred samples exercise many requests on every server."""
    base = dict(endpoints=endpoints, refresh_interval_s=0.3, probe_max_backoff_s=0.5, request_tokens=256,
                max_inflight_tokens=4096, max_endpoint_inflight_tokens=768, max_buffered_tokens=8192,
                request_timeout_s=20.0, unavailable_timeout_s=30.0, startup_timeout_s=30.0, hedge_after_s=2.0)
    base.update(kw)
    return TargetsConfig(**base)


def make_samples(n: int, seed: int = 0, min_len: int = 32, max_len: int = 96, vocab: int = 512) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = rng.integers(0, vocab, size=int(rng.integers(min_len, max_len + 1))).astype(np.int32)
        # Dataset ids repeat (as across epochs); the wire uses the position, so this must not matter.
        out.append(Sample((0, i), sample_id=1000 + i % 50, token_ids=ids))
    return out


def open_stream(cfg: TargetsConfig, samples, client_kwargs: dict | None = None) -> tuple[TargetPool, Dispatcher]:
    pool = TargetPool(EndpointSource(cfg.endpoints), cfg, client_kwargs=client_kwargs)
    pool.start()
    return pool, Dispatcher(pool, iter(samples), cfg).start()


class Checker:
    """Checks each delivery is the next sample in order, with exactly the features a local backend computes."""

    def __init__(self, samples: list[Sample] | None = None) -> None:
        self.backend = SyntheticBackend(hidden_size=H, dtype="fp32")
        self.samples = samples
        self.count = 0
        self.drops: dict[int, str] = {}

    def __call__(self, d: Delivery) -> None:
        if self.samples is not None:
            assert d.sample is self.samples[self.count], (d.sample.cursor, self.count)
        assert d.sample.cursor == (0, self.count)
        self.count += 1
        if d.drop_reason:
            self.drops[d.sample.cursor[1]] = d.drop_reason
            return
        (cap,) = self.backend.forward([d.sample.token_ids.tolist()], "hidden")
        assert d.features.sample_id == d.sample.sample_id
        assert torch.equal(d.features.aux_T3H, cap.aux_T3H)
        assert torch.equal(d.features.teacher_TH, cap.teacher_TH)


def in_thread(fn, *args) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def run_stream(cfg: TargetsConfig, samples, servers=(), on_delivery=None,
               client_kwargs: dict | None = None) -> tuple[Checker, dict]:
    """Open the pool, check every delivery in order, call `on_delivery(check, pool)` after each,
    and always clean up (the stream, the pool, then SIGKILL `servers`). Returns (checker, summary)."""
    import signal

    samples = list(samples)
    pool = stream = None
    check = Checker(samples)
    try:
        pool, stream = open_stream(cfg, samples, client_kwargs)
        for d in stream:
            check(d)
            if on_delivery is not None:
                on_delivery(check, pool)
        return check, stream.summary()
    finally:
        if stream is not None:
            stream.close()
        if pool is not None:
            pool.close()
        for s in servers:
            s.stop(signal.SIGKILL)
