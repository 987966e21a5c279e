"""Batching scheduler: packs samples from concurrent requests into forward passes.

- A request (one Flight DoGet) carries one or more samples; samples are the unit of packing.
- Fair between clients in *tokens*: each client has a queue and a count of tokens served; the
  next sample comes from the client served least so far (a client that goes idle and returns
  starts level with the others, it does not bank credit). A trainer sending long samples does
  not crowd out one sending short ones.
- A forward pass takes samples while the padded batch (B x longest T) stays within
  `max_batch_tokens`, all with the same feature spec (layers, teacher mode: one capture set and post-processing per pass). A single
  sample longer than the budget runs alone.
- Bounded work in memory: `submit` refuses a request that would push the tokens the server is
  responsible for — queued, plus computed but not yet sent (a slow reader's features) — past
  `max_queue_tokens`, with `Overloaded` (RESOURCE_EXHAUSTED + a retry hint from the measured
  throughput). So features held in memory never exceed `max_queue_tokens` tokens' worth and
  excess load never turns into an out-of-memory.
- Deadlines: a request already past its deadline is refused; queued work whose deadline
  passes, or whose client went away (`cancel`), is removed before it is computed.
- A failing multi-sample forward is retried one sample at a time, so one poisonous sample
  fails only its own request.
- One worker thread runs the backend; results go back per sample as they are computed.
- Generation (`submit_generate`) is a second request kind under the same queue bound, drain and
  deadlines: its sequences queue per client, join the running decode batch between steps while
  their KV reservations (prompt + max new tokens) fit in `max_batch_tokens`, least-served
  client first, and leave the step they finish (generation.py). Between the two kinds the
  worker is fair in device time: it runs whichever kind has used less of it (a kind returning
  from idle starts level, it does not bank credit).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from target_server.errors import DeadlineExceeded, Draining, ForwardFailed, Overloaded, SchedulerError
from target_server.backends.base import Backend, Capture
from target_server.gen_lane import GenLane
from target_server.generation import GenRequest, RequestLifecycle

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Request(RequestLifecycle):
    request_id: str
    client_id: str
    sample_ids: list[int]
    seqs: list[list[int]]
    teacher: str
    topk: int = 0
    deadline: float = 0.0  # unix seconds; 0 = none
    layer_ids: tuple[int, ...] = ()  # the feature spec's layers (the flight service fills it in)
    tensor_dtypes: tuple[tuple[str, str], ...] = ()  # the spec's per-tensor wire dtypes (e.g. aux as fp8)
    results: "queue.Queue[tuple[int, Capture] | BaseException]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = 0.0  # monotonic

    def __post_init__(self) -> None:
        self.tokens = sum(len(s) for s in self.seqs)
        self.held = 0  # tokens computed for this request and not yet released by its stream



@dataclass(eq=False)
class _Item:
    request: Request
    index: int

    @property
    def length(self) -> int:
        return len(self.request.seqs[self.index])

    @property
    def key(self) -> tuple[str, int, tuple[int, ...]]:
        # One forward pass serves one feature spec (one capture set, one post-processing).
        return (self.request.teacher, self.request.topk, self.request.layer_ids)


@dataclass(eq=False)
class _Client:
    items: "collections.deque[_Item]" = field(default_factory=collections.deque)
    served: int = 0  # tokens taken into forward passes while this client had work queued


class Scheduler:
    def __init__(self, backend: Backend, *, max_batch_tokens: int = 8192, max_queue_tokens: int = 65536,
                 metrics=None) -> None:
        self.backend = backend
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_tokens = max_queue_tokens
        self.metrics = metrics
        self._clients: dict[str, _Client] = {}
        self._queued_tokens = 0
        self._held_tokens = 0  # computed, not yet sent
        self._cv = threading.Condition()
        self._stopping = False
        self._draining = False
        self._busy = False  # the worker holds a batch
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._tokens_per_s = 0.0  # smoothed forward throughput, for retry hints
        self._gen = GenLane(backend, self._cv, max_batch_tokens=max_batch_tokens, metrics=metrics)
        self._loop = self._gen.loop  # the running decode batch
        self._kind_seconds = {"features": 0.0, "generate": 0.0}  # device time used, for fairness between kinds

    # ---------------------------------------------------------------- client side
    def submit(self, req: Request) -> None:
        with self._cv:
            self._admission_check(req.request_id, req.expired(), req.tokens)
            client = self._clients.get(req.client_id)
            if client is None:
                # A (re)arriving client starts level with the least-served active client.
                floor = min((c.served for c in self._clients.values()), default=0)
                client = self._clients[req.client_id] = _Client(served=floor)
            req.submitted_at = time.monotonic()
            client.items.extend(_Item(req, i) for i in range(len(req.seqs)))
            self._queued_tokens += req.tokens
            self._report_queue()
            self._cv.notify_all()

    def submit_generate(self, req: GenRequest) -> None:
        """Queue a generation request (same refusals as `submit`); results arrive per prompt."""
        with self._cv:
            self._admission_check(req.request_id, req.expired(), req.tokens)
            self._gen.enqueue(req)
            self._queued_tokens += req.tokens
            self._report_queue()
            self._cv.notify_all()

    def cancel_generate(self, req: GenRequest) -> None:
        """The caller went away: drop its queued sequences; running ones leave at the next step."""
        with self._cv:
            req.cancelled.set()
            self._queued_tokens -= self._gen.purge(req)
            self._report_queue()
            self._cv.notify_all()

    @property
    def batched_generation(self) -> bool:
        return self._gen.batched

    def _admission_check(self, request_id: str, expired: bool, tokens: int) -> None:
        if self._draining or self._stopping:
            raise Draining("server is draining; send the request to another server")
        if expired:
            raise DeadlineExceeded(f"request {request_id} arrived after its deadline")
        if self._queued_tokens + self._held_tokens + tokens > self.max_queue_tokens:
            raise Overloaded(
                f"{self._queued_tokens} tokens queued + {self._held_tokens} computed and unsent + {tokens} "
                f"requested > limit {self.max_queue_tokens}",
                retry_after_s=self._retry_hint(tokens),
            )

    def cancel(self, req: Request) -> int:
        """The request is over (finished, failed, client gone): drop its queued samples and release
        what it holds; nothing more is computed for it. Returns how many queued samples were dropped."""
        with self._cv:
            req.cancelled.set()
            self._release(req, req.held)
            return self._purge(req)

    def release(self, req: Request, tokens: int) -> None:
        """The stream has handed `tokens` of this request's features to the transport."""
        with self._cv:
            self._release(req, tokens)

    def _release(self, req: Request, tokens: int) -> None:
        tokens = min(tokens, req.held)
        if tokens:
            req.held -= tokens
            self._held_tokens -= tokens
            self._report_queue()

    def _purge(self, req: Request) -> int:
        client = self._clients.get(req.client_id)
        if client is None:
            return 0
        keep = collections.deque(it for it in client.items if it.request is not req)
        removed = len(client.items) - len(keep)
        if removed:
            self._queued_tokens -= sum(it.length for it in client.items if it.request is req)
            client.items = keep
            if not keep:
                del self._clients[req.client_id]
            self._report_queue()
            self._cv.notify_all()
        return removed

    def _retry_hint(self, tokens: int) -> float:
        """Seconds until `tokens` would fit, at the measured forward throughput (0.05 .. 10 s)."""
        excess = self._queued_tokens + self._held_tokens + tokens - self.max_queue_tokens
        rate = max(self._tokens_per_s, self._gen.tokens_per_s) or 1000.0
        return min(10.0, max(0.05, excess / rate))

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def held_tokens(self) -> int:
        return self._held_tokens

    @property
    def idle(self) -> bool:
        with self._cv:
            return self._queued_tokens == 0 and not self._busy and not self._loop.running

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread.start()

    def drain(self, timeout: float) -> bool:
        """Refuse new work, finish queued work; True if everything finished within `timeout`."""
        end = time.monotonic() + timeout
        with self._cv:
            self._draining = True
            while (self._queued_tokens > 0 or self._busy or self._loop.running) and time.monotonic() < end:
                self._cv.wait(timeout=min(0.1, max(0.0, end - time.monotonic())))
            return self._queued_tokens == 0 and not self._busy and not self._loop.running

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; queued work fails with UNAVAILABLE so its streams end at once."""
        with self._cv:
            self._stopping = True
            for client in list(self._clients.values()):
                for req in {id(it.request): it.request for it in client.items}.values():
                    req.fail(Draining("server is shutting down; retry on another server"))
            self._clients.clear()
            self._gen.fail_all(running=not self._busy)  # else the worker ends the batch when its step returns
            self._queued_tokens = 0
            self._report_queue()
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    # ---------------------------------------------------------------- worker
    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_tokens.set(self._queued_tokens)
            self.metrics.held_tokens.set(self._held_tokens)
            self.metrics.gen_queued.set(self._gen.queued_seqs)
            self.metrics.gen_running.set(len(self._loop.running))

    def _drop_expired(self, now: float) -> None:
        for client in list(self._clients.values()):
            while client.items and (client.items[0].request.cancelled.is_set()
                                    or client.items[0].request.expired(now)):
                req = client.items[0].request
                if not req.cancelled.is_set():
                    req.fail(DeadlineExceeded(f"request {req.request_id} passed its deadline while queued"))
                self._purge(req)
                if req.client_id not in self._clients:
                    break

    def _take_batch(self) -> list[_Item]:
        """Least-served client first; one feature-spec key; padded tokens within the budget."""
        self._drop_expired(time.time())
        batch: list[_Item] = []
        key, longest = None, 0
        while True:
            chosen = None
            for cid, client in sorted(self._clients.items(), key=lambda kv: kv[1].served):
                item = client.items[0]
                if key is not None and item.key != key:
                    continue
                if batch and max(longest, item.length) * (len(batch) + 1) > self.max_batch_tokens:
                    continue
                chosen = cid
                break
            if chosen is None:
                return batch
            client = self._clients[chosen]
            item = client.items.popleft()
            client.served += item.length
            self._queued_tokens -= item.length
            if not client.items:
                del self._clients[chosen]
            batch.append(item)
            key, longest = item.key, max(longest, item.length)

    def _next_kind(self) -> str:
        """The kind of work that has used less device time (a kind without work keeps level)."""
        has = {"features": bool(self._clients), "generate": self._gen.has_work}
        top = max(self._kind_seconds.values())
        for k, busy in has.items():
            if not busy:
                self._kind_seconds[k] = top
        if has["features"] and has["generate"]:
            return min(self._kind_seconds, key=self._kind_seconds.get)
        return "features" if has["features"] else "generate"

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._clients and not self._gen.has_work:
                    self._cv.wait(timeout=0.5)
                if self._stopping:
                    return
                kind = self._next_kind()
                if kind == "features":
                    batch: list = self._take_batch()
                else:
                    batch, released = self._gen.admit()
                    self._queued_tokens -= released
                self._busy = bool(batch) or kind == "generate"
                self._report_queue()
            if not self._busy:
                continue
            t0 = time.perf_counter()
            try:
                if kind == "features":
                    self._run_batch(batch)
                else:
                    self._gen.run(batch)
            finally:
                with self._cv:
                    self._kind_seconds[kind] += time.perf_counter() - t0
                    self._busy = False
                    if self._stopping:
                        self._gen.fail_all(running=True)
                    self._report_queue()
                    self._cv.notify_all()

    def _forward(self, batch: list[_Item]) -> list[Capture]:
        teacher, topk, layer_ids = batch[0].key
        seqs = [it.request.seqs[it.index] for it in batch]
        t0 = time.perf_counter()
        # Requests without a spec (direct scheduler use) take the backend's default layers.
        caps = self.backend.forward(seqs, teacher, topk, **({"layer_ids": layer_ids} if layer_ids else {}))
        dt = time.perf_counter() - t0
        if len(caps) != len(batch):
            raise RuntimeError(f"backend returned {len(caps)} captures for {len(batch)} sequences")
        ntok = sum(len(s) for s in seqs)
        self._tokens_per_s = ntok / max(dt, 1e-6) if not self._tokens_per_s else \
            0.8 * self._tokens_per_s + 0.2 * (ntok / max(dt, 1e-6))
        if self.metrics is not None:
            self.metrics.observe_batch(len(batch), ntok, max(map(len, seqs)) * len(seqs), dt)
        return caps

    def _run_batch(self, batch: list[_Item]) -> None:
        now = time.monotonic()
        if self.metrics is not None:
            for it in batch:
                self.metrics.queue_wait_seconds.observe(now - it.request.submitted_at)
        batch = [it for it in batch if not it.request.cancelled.is_set()]
        if not batch:
            return
        try:
            pairs = list(zip(batch, self._forward(batch)))
        except Exception as e:  # a backend failure fails requests, never the server
            if len(batch) == 1:
                log.exception("forward failed for sample %d of request %s", batch[0].index, batch[0].request.request_id)
                self._fail(batch[0].request, ForwardFailed(f"forward failed: {type(e).__name__}: {e}"))
                return
            log.warning("forward of %d samples failed (%s: %s); retrying one sample at a time",
                        len(batch), type(e).__name__, e)
            for it in batch:
                self._run_batch_one(it)
            return
        for it, cap in pairs:
            self._deliver(it, cap)

    def _deliver(self, it: _Item, cap: Capture) -> None:
        # Checked and counted under the lock, so a stream closing at this moment cannot leak holds.
        with self._cv:
            if it.request.cancelled.is_set():
                return
            it.request.held += it.length
            self._held_tokens += it.length
            self._report_queue()
        it.request.results.put((it.index, cap))

    def _fail(self, req: Request, exc: SchedulerError) -> None:
        req.fail(exc)
        with self._cv:
            self._purge(req)

    def _run_batch_one(self, it: _Item) -> None:
        if it.request.cancelled.is_set():
            return
        try:
            (cap,) = self._forward([it])
        except Exception as e:
            log.exception("forward failed for sample %d of request %s", it.index, it.request.request_id)
            self._fail(it.request, ForwardFailed(f"forward failed: {type(e).__name__}: {e}"))
            return
        self._deliver(it, cap)
