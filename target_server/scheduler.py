"""Batching scheduler: packs samples from concurrent requests into forward passes.

- A request (one Flight DoGet) carries one or more samples. Samples are the unit of packing: a
  forward pass takes samples from the clients' queues round-robin (fair between trainers) until
  the padded batch (B x longest T) would exceed `max_batch_tokens`.
- The queue is bounded in tokens: `submit` refuses a request that would push the queued tokens
  past `max_queue_tokens` with `Overloaded` (sent as RESOURCE_EXHAUSTED with a retry hint),
  so excess load never turns into an out-of-memory.
- Work whose deadline has passed, or whose client went away, is dropped before it is computed.
- One worker thread runs the backend; results stream back per sample as they are computed.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from common import status
from common.errors import SpecRelayError
from target_server.backends.base import Backend, Capture

log = logging.getLogger(__name__)


class Overloaded(SpecRelayError):
    def __init__(self, queued: int, limit: int, retry_after_s: float) -> None:
        super().__init__(status.message(status.RESOURCE_EXHAUSTED, f"{queued} tokens queued, limit {limit}", retry_after_s))
        self.retry_after_s = retry_after_s


class DeadlineExceeded(SpecRelayError):
    pass


class Draining(SpecRelayError):
    pass


@dataclass
class Request:
    request_id: str
    client_id: str
    sample_ids: list[int]
    seqs: list[list[int]]
    teacher: str
    topk: int = 0
    deadline: float = 0.0  # unix seconds; 0 = none
    results: "queue.Queue[tuple[int, Capture] | BaseException]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.seqs)

    def expired(self, now: float) -> bool:
        return self.deadline > 0 and now > self.deadline

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Item:
    request: Request
    index: int

    @property
    def length(self) -> int:
        return len(self.request.seqs[self.index])

    @property
    def key(self) -> tuple[str, int]:
        return (self.request.teacher, self.request.topk)


class Scheduler:
    def __init__(self, backend: Backend, *, max_batch_tokens: int = 8192, max_queue_tokens: int = 65536,
                 metrics=None) -> None:
        self.backend = backend
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_tokens = max_queue_tokens
        self.metrics = metrics
        self._queues: "collections.OrderedDict[str, collections.deque[_Item]]" = collections.OrderedDict()
        self._queued_tokens = 0
        self._cv = threading.Condition()
        self._stopping = False
        self._draining = False
        self._inflight = 0  # items taken by the worker, not yet delivered
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._tokens_per_s = 0.0  # smoothed, for retry hints

    # ---------------------------------------------------------------- client side
    def submit(self, req: Request) -> None:
        with self._cv:
            if self._draining or self._stopping:
                raise Draining("server is draining; send the request to another server")
            if self._queued_tokens + req.tokens > self.max_queue_tokens and self._queued_tokens > 0:
                rate = max(self._tokens_per_s, 1.0)
                raise Overloaded(self._queued_tokens, self.max_queue_tokens,
                                 retry_after_s=min(5.0, max(0.05, self._queued_tokens / rate)))
            q = self._queues.setdefault(req.client_id, collections.deque())
            for i in range(len(req.seqs)):
                q.append(_Item(req, i))
            self._queued_tokens += req.tokens
            self._report_queue()
            self._cv.notify()

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread.start()

    def drain(self, timeout: float) -> bool:
        """Refuse new work, finish queued work; True if everything finished within `timeout`."""
        with self._cv:
            self._draining = True
            end = time.monotonic() + timeout
            while (self._queued_tokens > 0 or self._inflight > 0) and time.monotonic() < end:
                self._cv.wait(timeout=0.05)
            return self._queued_tokens == 0 and self._inflight == 0

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    # ---------------------------------------------------------------- worker
    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_tokens.set(self._queued_tokens)

    def _take_batch(self) -> list[_Item]:
        """Round-robin over clients; same teacher key; padded tokens within budget."""
        batch: list[_Item] = []
        key = None
        longest = 0
        now = time.time()
        progressed = True
        while progressed:
            progressed = False
            for client in list(self._queues):
                q = self._queues[client]
                # Drop work nobody can use any more.
                while q and (q[0].request.cancelled.is_set() or q[0].request.expired(now)):
                    item = q.popleft()
                    self._queued_tokens -= item.length
                    req = item.request
                    if req.expired(now) and not req.cancelled.is_set():
                        req.cancel()
                        req.results.put(DeadlineExceeded(f"request {req.request_id} passed its deadline in the queue"))
                if not q:
                    del self._queues[client]
                    continue
                item = q[0]
                if key is not None and item.key != key:
                    continue
                new_longest = max(longest, item.length)
                if batch and new_longest * (len(batch) + 1) > self.max_batch_tokens:
                    continue
                q.popleft()
                self._queued_tokens -= item.length
                batch.append(item)
                key, longest = item.key, new_longest
                progressed = True
                # Move this client to the back: the next sample comes from someone else.
                self._queues.move_to_end(client)
                if not q:
                    del self._queues[client]
                break
        return batch

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and self._queued_tokens == 0:
                    self._cv.wait(timeout=0.5)
                if self._stopping:
                    return
                batch = self._take_batch()
                self._inflight = len(batch)
                self._report_queue()
            if not batch:
                continue
            teacher, topk = batch[0].key
            seqs = [it.request.seqs[it.index] for it in batch]
            t0 = time.perf_counter()
            try:
                caps = self.backend.forward(seqs, teacher, topk)
            except Exception as e:  # a backend failure fails these requests, not the server
                log.exception("forward failed for %d samples", len(batch))
                for it in batch:
                    it.request.results.put(e)
                caps = None
            dt = time.perf_counter() - t0
            ntok = sum(len(s) for s in seqs)
            self._tokens_per_s = 0.8 * self._tokens_per_s + 0.2 * (ntok / max(dt, 1e-6))
            if self.metrics is not None:
                self.metrics.observe_batch(len(batch), ntok, max(map(len, seqs)) * len(seqs), dt)
            if caps is not None:
                for it, cap in zip(batch, caps):
                    it.request.results.put((it.index, cap))
            with self._cv:
                self._inflight = 0
                self._cv.notify_all()

