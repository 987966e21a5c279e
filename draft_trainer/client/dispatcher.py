"""The dispatcher: keeps a rank's next samples in flight across the pool and hands back features
in the rank's order.

    stream = Dispatcher(pool, samples, cfg.targets, metrics=m).start()
    for d in stream:            # d.features, or d.drop_reason; in the order of `samples`
        ...
    stream.close()

The same machinery carries generation (`kind=GenerateKind(...)`, kinds.py; d.result holds the
completion) for `regenerate`, unordered (`ordered=False`: results as they arrive) and from a
source that may yield None ("nothing now, more later": work that depends on earlier answers).

How it works (one thread decides, one thread per request does the network I/O):
- Samples are numbered (seq) in the order the source yields them. Up to `max_buffered_tokens`
  of them may be ahead of the trainer (in flight or waiting in the reorder buffer), of which up to
  `max_inflight_tokens` in flight, at most the endpoint's window on any one server. So while the
  trainer runs step n, the samples of steps n+1..n+d are being computed.
- A request carries consecutive pending samples up to `request_tokens` and goes to the usable
  server with the fewest outstanding tokens. On the wire, a sample's id is its seq (unique in
  the run, unlike dataset ids across epochs); features come back with the dataset id restored.
- Failures (requests are idempotent, so any server may answer, any number of times):
    UNAVAILABLE / DEADLINE_EXCEEDED / INTERNAL / bad stream -> server marked down, the request's
        unanswered samples re-issued elsewhere; a sample failing `max_attempts` times is dropped
        (reason target_error) rather than retried forever;
    RESOURCE_EXHAUSTED -> the server is sent nothing before its retry hint and its window halves;
        the samples are re-issued (no attempt counted);
    INVALID_ARGUMENT -> the request's samples are retried one per request; a sample rejected on
        its own is dropped (reason invalid_argument).
- Hedging: when the trainer is blocked on a sample whose request is older than
  max(hedge_after_s, 4x the typical request time), its unanswered samples are also sent to
  another server; the first answer wins, later ones are counted as duplicates and discarded.
- No usable server for `unavailable_timeout_s` while work is waiting -> TargetUnavailableError
  to the consumer (after everything already received was handed out).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common import status
from common.errors import SchemaError, TargetUnavailableError
from common.features import FeatureSpec, SampleFeatures
from draft_trainer.client.kinds import FeatureKind
from draft_trainer.client.pool import Endpoint, TargetPool
from draft_trainer.client.reorder import ArrivalBuffer, ReorderBuffer
from draft_trainer.client.balance import choose, fits, hedge_target, overdue_after, request_cap
from draft_trainer.client.config import PoolConfig
from draft_trainer.client.metrics import PoolMetrics

log = logging.getLogger(__name__)

WAKE_S = 0.05  # the dispatch thread re-checks timers (backoff, hedging, unavailability) this often


@dataclass
class Sample:
    """One position of a rank's sample order."""

    cursor: tuple[int, int]            # (epoch, index in the epoch order): where the trainer resumes
    sample_id: int                     # the dataset's id
    token_ids: np.ndarray | list[int]
    loss_mask: np.ndarray | None = None  # training: 1 = supervised token (carried to the consumer untouched)
    truncated: bool = False            # training: token_ids were cut to the run's maximum length
    data: Any = None                   # other request kinds' payload (e.g. a generation's key)
    drop_reason: str = ""              # dropped before dispatch (too short, ...): delivered as a drop, in order

    @property
    def tokens(self) -> int:
        return 0 if self.drop_reason else len(self.token_ids)


@dataclass
class Delivery:
    sample: Sample
    features: SampleFeatures | None = None
    drop_reason: str = ""
    result: Any = None                 # what a non-feature kind answered (e.g. a completion)
    seq: int = -1                      # the dispatcher's position number


@dataclass(eq=False)
class _Work:
    seq: int
    sample: Sample
    tokens: int
    attempts: int = 0
    inflight: int = 0                  # requests currently carrying it (2 while hedged)
    done: bool = False
    dispatched: bool = False
    solo: bool = False                 # retry alone (to find which sample of a request is invalid)
    hedged: bool = False

    def __lt__(self, other: "_Work") -> bool:  # the pending heap: lowest seq first
        return self.seq < other.seq


@dataclass(eq=False)
class _Request:
    endpoint: Endpoint
    works: list[_Work]
    started: float
    hedge: bool = False
    ahead_tokens: int = 0              # tokens already in flight on the endpoint when it was sent
    received: set[int] = field(default_factory=set)
    open_tokens: int = 0
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


@dataclass
class DispatchStats:
    pulled: int = 0                    # positions taken from the source
    dispatched: int = 0                # samples sent to a server at least once
    delivered: int = 0                 # handed to the consumer with features
    dropped: dict[str, int] = field(default_factory=dict)  # handed to the consumer as drops, by reason
    reissued: int = 0                  # samples sent again after a failed request
    retries: dict[str, int] = field(default_factory=dict)  # re-issues by reason
    hedges: int = 0
    duplicates: int = 0                # answers that arrived after another server's (hedging)
    requests: dict[str, int] = field(default_factory=dict)  # by outcome

    def bump(self, table: dict[str, int], key: str, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n


class Dispatcher:
    def __init__(self, pool: TargetPool, samples: Iterator[Sample | None], cfg: PoolConfig,
                 metrics: PoolMetrics | None = None, *, kind=None, spec: FeatureSpec | None = None,
                 ordered: bool = True) -> None:
        if pool.info is None:
            raise RuntimeError("start the pool (handshake) before the dispatcher")
        self.pool = pool
        self.cfg = cfg
        self.metrics = metrics or pool.metrics
        self.cv = pool.cv
        self.stats = DispatchStats()
        self._source = iter(samples)
        self._peeked: Sample | None = None
        self._source_done = False
        self._next_seq = 0
        self._works: dict[int, _Work] = {}          # seq -> work not yet handed to the consumer
        self._pending: list[_Work] = []             # heap: waiting for a request
        self._pending_tokens = 0
        self._active: set[_Request] = set()
        self._reorder = ReorderBuffer() if ordered else ArrivalBuffer()
        self.ordered = ordered
        self._inflight_tokens = 0
        self._buffered_tokens = 0
        self._typical_s = max(cfg.hedge_after_s, 0.1)  # EWMA of successful request time
        self._consumer_waiting = False
        self._no_server_since: float | None = None
        self._fatal: BaseException | None = None
        self._closed = False
        # Default kind: the features of `spec` (the run's method; default: the servers' aux layers).
        spec = spec or FeatureSpec(tuple(pool.info.aux_layer_ids), cfg.teacher, cfg.topk)
        self.kind = kind or FeatureKind(spec, pool.info.hidden_size, pool.info.dtype)
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)

    def start(self) -> "Dispatcher":
        self._thread.start()
        return self

    # ---------------------------------------------------------------- consumer side
    def __iter__(self) -> "Dispatcher":
        return self

    def __next__(self) -> Delivery:
        with self.cv:
            while not self._reorder.ready():
                if self._fatal is not None:
                    raise self._fatal
                if self._exhausted():
                    raise StopIteration
                if self._closed:
                    raise RuntimeError("dispatcher closed")
                self._consumer_waiting = True
                self.cv.notify_all()
                self.cv.wait(timeout=0.5)
            self._consumer_waiting = False
            d = self._reorder.pop()
            w = self._works.pop(d.seq)
            self._buffered_tokens -= w.tokens
            self.metrics.buffered_tokens.set(self._buffered_tokens)
            if d.drop_reason:
                self.stats.bump(self.stats.dropped, d.drop_reason)
            else:
                self.stats.delivered += 1
            self.cv.notify_all()  # window space for the dispatch thread
            return d

    def _exhausted(self) -> bool:
        return self._source_done and self._peeked is None and not self._works

    def close(self) -> None:
        with self.cv:
            self._closed = True
            self.cv.notify_all()
        self._thread.join(timeout=5)

    def summary(self) -> dict[str, Any]:
        """Accounting for the run summary: pulled = delivered + dropped + unconsumed."""
        with self.cv:
            s = self.stats
            return {
                "pulled": s.pulled, "dispatched": s.dispatched, "delivered": s.delivered, "dropped": dict(s.dropped),
                "unconsumed": s.pulled - s.delivered - sum(s.dropped.values()), "reissued": s.reissued,
                "retries": dict(s.retries), "hedges": s.hedges, "duplicates": s.duplicates,
                "requests": dict(s.requests),
                "endpoints": {a: ep.summary() for a, ep in sorted(self.pool.endpoints.items())},
            }

    # ---------------------------------------------------------------- dispatch thread
    def _run(self) -> None:
        try:
            with self.cv:
                while not self._closed and self._fatal is None:
                    now = time.monotonic()
                    self._check_unavailable(now)
                    self._hedge(now)
                    self._fill(now)
                    self.cv.wait(timeout=WAKE_S)
        except BaseException as e:  # never die silently: the consumer gets the error
            log.exception("dispatcher failed")
            with self.cv:
                self._fatal = e
                self.cv.notify_all()

    def _pull(self) -> None:
        """Move samples from the source into the pending heap while the buffer window allows."""
        limit = self.cfg.max_buffered_tokens
        while not self._source_done:
            if self._peeked is None:
                try:
                    self._peeked = next(self._source)
                except StopIteration:
                    self._source_done = True
                    return
            s = self._peeked
            if s is None:  # nothing now: the source has more once earlier answers are in
                return
            tokens = 0 if s.drop_reason else self.kind.cost(s.token_ids)
            if tokens and self._buffered_tokens and self._buffered_tokens + s.tokens > limit:
                return
            self._peeked = None
            w = _Work(self._next_seq, s, tokens)
            self._next_seq += 1
            self._works[w.seq] = w
            self.stats.pulled += 1
            if s.drop_reason:
                w.done = True
                self._reorder.put(w.seq, Delivery(s, drop_reason=s.drop_reason, seq=w.seq))
                self.cv.notify_all()
                continue
            self._buffered_tokens += w.tokens
            self._push(w)
        self.metrics.buffered_tokens.set(self._buffered_tokens)

    def _fill(self, now: float) -> None:
        self._pull()
        while self._pending:
            if self._inflight_tokens and self._inflight_tokens + self._pending[0].tokens > self.cfg.max_inflight_tokens:
                return
            ep = self._choose(self.pool.usable(now), self._pending[0].tokens)
            if ep is None:
                return
            self._issue(ep, self._take(ep), now)
            self._pull()

    def _choose(self, eps: list[Endpoint], tokens: int) -> Endpoint | None:
        """The server for the next request (balance.choose): soonest expected finish; a full fast
        server is waited for unless it holds an overdue request (it may be hung)."""
        now = time.monotonic()
        want = min(self._pending_tokens, self.cfg.request_tokens)
        stuck = {r.endpoint for r in self._active if r.started < now - self._overdue_s()}
        return choose(eps, tokens, want, stuck, now)

    def _overdue_s(self) -> float:
        return overdue_after(self.cfg.hedge_after_s, self._typical_s)

    def _push(self, w: _Work) -> None:
        heapq.heappush(self._pending, w)
        self._pending_tokens += w.tokens

    def _pop(self) -> _Work:
        w = heapq.heappop(self._pending)
        self._pending_tokens -= w.tokens
        return w

    def _take(self, ep: Endpoint) -> list[_Work]:
        """Lowest pending seqs for one request to `ep` (always at least one)."""
        cap = request_cap(self.cfg.request_tokens, ep.info.max_request_tokens if ep.info is not None else 0,
                          ep.window_tokens - ep.inflight_tokens, self.cfg.max_inflight_tokens - self._inflight_tokens)
        works = [self._pop()]
        total = works[0].tokens
        while (self._pending and not works[0].solo and not self._pending[0].solo
               and fits(total, len(works), self._pending[0].tokens, cap, self.kind.max_items)):
            w = self._pop()
            works.append(w)
            total += w.tokens
        return works

    def _issue(self, ep: Endpoint, works: list[_Work], now: float, hedge: bool = False) -> None:
        req = _Request(ep, works, now, hedge=hedge, ahead_tokens=ep.inflight_tokens)
        req.open_tokens = sum(w.tokens for w in works)
        for w in works:
            w.inflight += 1
            if not w.dispatched:
                w.dispatched = True
                self.stats.dispatched += 1
                self.metrics.samples_dispatched.inc()
        self._move_tokens(ep, req.open_tokens)
        ep.sent(now)
        self._active.add(req)
        threading.Thread(target=self._execute, args=(req, ep.client), name=f"req-{req.request_id}",
                         daemon=True).start()

    def _move_tokens(self, ep: Endpoint, n: int) -> None:
        ep.carry(n, time.monotonic())
        self._inflight_tokens += n
        self.metrics.inflight_tokens.set(self._inflight_tokens)
        self.metrics.endpoint_inflight_tokens.labels(endpoint=ep.address).set(ep.inflight_tokens)

    # ---------------------------------------------------------------- request threads
    def _execute(self, req: _Request, client) -> None:
        by_seq = {w.seq: w for w in req.works}
        err: BaseException | None = None
        try:
            for seq, result in self.kind.send(client, req.works, self.cfg.request_timeout_s):
                w = by_seq.get(seq)
                if w is None or seq in req.received:
                    raise SchemaError(f"server {req.endpoint.address} answered for sample {seq}, which "
                                      f"request {req.request_id} did not ask for (or twice)")
                self.kind.check(req.endpoint.address, w, result)
                with self.cv:
                    if self._closed:
                        return
                    self._on_sample(req, w, result)
        except BaseException as e:  # classified below; never lost
            err = e
        with self.cv:
            if not self._closed:
                self._on_done(req, err)

    def _on_sample(self, req: _Request, w: _Work, f: Any) -> None:
        req.received.add(w.seq)
        req.open_tokens -= w.tokens
        self._move_tokens(req.endpoint, -w.tokens)
        w.inflight -= 1
        req.endpoint.answered()
        if w.done:
            self.stats.duplicates += 1
            return
        w.done = True
        if isinstance(f, SampleFeatures):
            d = Delivery(w.sample, dataclasses.replace(f, sample_id=w.sample.sample_id), seq=w.seq)
        else:
            d = Delivery(w.sample, result=f, seq=w.seq)
        self._reorder.put(w.seq, d)
        self.cv.notify_all()

    def _on_done(self, req: _Request, err: BaseException | None) -> None:
        self._active.discard(req)
        ep = req.endpoint
        self._move_tokens(ep, -req.open_tokens)
        req.open_tokens = 0
        missing = [w for w in req.works if w.seq not in req.received]
        for w in missing:
            w.inflight -= 1
        if err is None and missing:
            err = SchemaError(f"server {ep.address} ended request {req.request_id} without samples "
                              f"{[w.seq for w in missing]}")
        if err is None:
            self.stats.bump(self.stats.requests, "ok")
            self.metrics.requests.labels(status="ok").inc()
            dt = time.monotonic() - req.started
            self.metrics.request_seconds.observe(dt)
            self._typical_s = 0.9 * self._typical_s + 0.1 * dt
            tokens = sum(w.tokens for w in req.works)
            self.pool.request_ok(ep, tokens)
            self.pool.observe_speed(ep, dt, req.ahead_tokens + tokens)
            self.cv.notify_all()
            return
        c = status.classify(err)
        self.stats.bump(self.stats.requests, c.code.lower())
        self.metrics.requests.labels(status=c.code.lower()).inc()
        detail = f"{c.code}: {c.detail[:500]}"
        if c.code == status.RESOURCE_EXHAUSTED:
            self.pool.slow_down(ep, c.retry_after_s)
            self._requeue(missing, "resource_exhausted")
        elif c.code == status.INVALID_ARGUMENT:
            if len(req.works) == 1 and missing:
                log.warning("sample %d (position %s) dropped: %s rejected it: %s", missing[0].sample.sample_id,
                            missing[0].sample.cursor, ep.address, c.detail[:500])
                self._drop(missing[0], "invalid_argument")
            else:
                for w in missing:
                    w.solo = True
                self._requeue(missing, "isolate_invalid")
        elif c.code == status.UNAUTHENTICATED:
            self.pool.refuse(ep, f"{detail}\n{self.pool.auth_hint}")
            self._requeue(missing, "unauthenticated")
        else:  # UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, a malformed stream
            if c.code == status.DEADLINE_EXCEEDED:  # once back, it is known to be slow
                self.pool.observe_speed(ep, time.monotonic() - req.started,
                                        req.ahead_tokens + sum(w.tokens for w in req.works), at_least=True)
            self.pool.mark_down(ep, detail)
            failed = []
            for w in missing:
                w.attempts += 1
                if w.attempts >= self.cfg.max_attempts and not w.done:
                    log.error("sample %d (position %s) dropped after %d failed attempts; last: %s",
                              w.sample.sample_id, w.sample.cursor, w.attempts, detail)
                    self._drop(w, "target_error")
                else:
                    failed.append(w)
            self._requeue(failed, c.code.lower())
        self.cv.notify_all()

    def _requeue(self, works: list[_Work], reason: str) -> None:
        for w in works:
            if w.done or w.inflight > 0:  # answered, or a hedged copy is still on its way
                continue
            self._push(w)
            self.stats.reissued += 1
            self.stats.bump(self.stats.retries, reason)
            self.metrics.retries.labels(reason=reason).inc()

    def _drop(self, w: _Work, reason: str) -> None:
        w.done = True
        self._reorder.put(w.seq, Delivery(w.sample, drop_reason=reason, seq=w.seq))

    # ---------------------------------------------------------------- timers
    def _hedge(self, now: float) -> None:
        if self.cfg.hedge_after_s <= 0 or not self._consumer_waiting:
            return
        head = self._works.get(self._reorder.next_seq if self.ordered else
                               min((q for q, w in self._works.items() if not w.done), default=-1))
        if head is None or head.done or head.hedged or head.inflight != 1:
            return
        req = next((r for r in self._active if head in r.works and head.seq not in r.received), None)
        if req is None or now - req.started < self._overdue_s():
            return
        ep = hedge_target([e for e in self.pool.usable(now) if e is not req.endpoint], head.tokens)
        if ep is None:
            return
        works = [w for w in req.works if w.seq not in req.received and not w.done and w.inflight == 1 and not w.hedged]
        for w in works:
            w.hedged = True
        log.info("hedging %d samples of request %s (%.1fs on %s) to %s", len(works), req.request_id,
                 now - req.started, req.endpoint.address, ep.address)
        self.stats.hedges += 1
        self.metrics.hedges.inc()
        self._issue(ep, works, now, hedge=True)

    def _check_unavailable(self, now: float) -> None:
        waiting = bool(self._pending) or self._consumer_waiting
        if self.pool.num_up() > 0 or not waiting:
            self._no_server_since = None
            return
        if self._no_server_since is None:
            self._no_server_since = now
            log.warning("no target server is up; waiting up to %.0fs (targets.unavailable_timeout_s)",
                        self.cfg.unavailable_timeout_s)
        elif now - self._no_server_since > self.cfg.unavailable_timeout_s:
            self._fatal = TargetUnavailableError(
                f"no target server reachable for {self.cfg.unavailable_timeout_s:.0f}s "
                f"(targets.unavailable_timeout_s) at {self.pool.source.spec}:\n  {self.pool.describe()}\n"
                "Restart or add target servers, then resume from the checkpoint.")
            self.cv.notify_all()
