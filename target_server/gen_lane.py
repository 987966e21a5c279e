"""The scheduler's generation lane: queued sequences per client, fair admission, one decode step.

The scheduler owns the lock, the queue bound and the choice between feature and generation
work; this lane owns the generation queues, the per-client served counts and the running
batch (DecodeLoop). Methods marked "under the lock" are called with the scheduler's lock held;
`run` is called by the worker thread without it (it takes the lock to update counts).
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from target_server.backends.base import Completion
from target_server.errors import DeadlineExceeded, Draining, ForwardFailed
from target_server.generation import MAX_RUNNING_SEQS, DecodeLoop, GenRequest, GenSeq

log = logging.getLogger(__name__)


class GenLane:
    def __init__(self, backend, lock: threading.Condition, *, max_batch_tokens: int, metrics=None) -> None:
        self.backend, self._lock, self.metrics = backend, lock, metrics
        # The KV tokens the running sequences may reserve: the batch budget, or less where the
        # backend's KV pool holds fewer beside its feature passes (sglang: SGLang's memory profile).
        cap = backend.generation_kv_budget()
        self.max_batch_tokens = min(max_batch_tokens, cap) if cap else max_batch_tokens
        self.queues: dict[str, collections.deque[GenSeq]] = {}
        self.served: dict[str, int] = {}  # tokens (prompt + generated) per client with work
        self.loop = DecodeLoop(backend, metrics)
        self.tokens_per_s = 0.0

    @property
    def batched(self) -> bool:
        return self.loop.batched

    @property
    def has_work(self) -> bool:
        return bool(self.queues) or bool(self.loop.running)

    @property
    def queued_seqs(self) -> int:
        return sum(len(q) for q in self.queues.values())

    # ---------------------------------------------------------------- under the lock
    def enqueue(self, req: GenRequest) -> None:
        if req.client_id not in self.queues:
            # A (re)arriving client starts level with the least-served active one: no banked credit.
            floor = min(self.served.values(), default=0)
            self.served[req.client_id] = max(self.served.get(req.client_id, 0), floor)
            self.queues[req.client_id] = collections.deque()
        req.submitted_at = time.monotonic()
        self.queues[req.client_id].extend(GenSeq(req, i) for i in range(len(req.prompts)))

    def purge(self, req: GenRequest) -> int:
        """Drop the request's queued sequences; returns the queued tokens released."""
        q = self.queues.get(req.client_id)
        if not q:
            return 0
        keep = collections.deque(s for s in q if s.request is not req)
        released = sum(s.reserve for s in q if s.request is req)
        if keep:
            self.queues[req.client_id] = keep
        else:
            del self.queues[req.client_id]
        return released

    def fail_all(self, running: bool) -> None:
        for q in self.queues.values():
            for s in q:
                s.request.fail(Draining("server is shutting down; retry on another server"))
        self.queues.clear()
        if running:
            for s in self.loop.running:
                s.request.fail(Draining("server is shutting down; retry on another server"))

    def admit(self) -> tuple[list[GenSeq], int]:
        """(sequences that join the running batch now, queued tokens they release).

        Least-served client first, while the batch's KV reservations (prompt + max new tokens
        per sequence) and the joining prefill (rows x longest prompt) stay within
        `max_batch_tokens`; a sequence larger than the budget runs when the batch is empty. Where
        the decoder pads every row to the longest (`Decoder.padded_rows`), the KV that counts is
        rows x the longest reservation: short rows beside a long one cost its length each.
        """
        now = time.time()
        for s in self.loop.running:
            if s.request.expired(now):
                s.request.fail(DeadlineExceeded(f"request {s.request.request_id} passed its deadline while generating"))
        if not self.batched:  # one prompt at a time through Backend.generate
            if self.loop.running or not self.queues:
                return [], 0
            s = self._pop(self._least_served())
            return [s], s.reserve
        admitted: list[GenSeq] = []
        released, reserved, longest = 0, self.loop.reserved, 0
        widest = max((s.reserve for s in self.loop.running), default=0)
        blocked: set[str] = set()
        while len(self.loop.running) + len(admitted) < MAX_RUNNING_SEQS:
            cid = self._least_served(exclude=blocked)
            if cid is None:
                break
            s = self.queues[cid][0]
            rows = len(self.loop.running) + len(admitted) + 1
            kv = max(widest, s.reserve) * rows if self.loop.padded_rows else reserved + s.reserve
            fits = kv <= self.max_batch_tokens and \
                max(longest, len(s.prompt)) * (len(admitted) + 1) <= self.max_batch_tokens
            if not fits and (self.loop.running or admitted):
                blocked.add(cid)  # its head waits for rows to leave; other clients may still fit
                continue
            self._pop(cid)
            released += s.reserve
            if s.request.cancelled.is_set():
                continue
            admitted.append(s)
            reserved += s.reserve
            widest = max(widest, s.reserve)
            longest = max(longest, len(s.prompt))
        return admitted, released

    def _least_served(self, exclude: set[str] = frozenset()) -> str | None:
        return min((c for c in self.queues if c not in exclude), key=lambda c: self.served[c], default=None)

    def _pop(self, cid: str) -> GenSeq:
        q = self.queues[cid]
        s = q.popleft()
        if not q:
            del self.queues[cid]
        self.served[cid] += len(s.prompt)
        if s.request.expired():
            s.request.fail(DeadlineExceeded(f"request {s.request.request_id} passed its deadline while queued"))
        return s

    # ---------------------------------------------------------------- worker thread
    def run(self, admitted: list[GenSeq]) -> None:
        if not self.batched:
            for s in admitted:
                self._run_one(s)
            return
        seqs = self.loop.running + admitted
        before = {id(s): len(s.tokens) for s in seqs}
        t0 = time.perf_counter()
        try:
            finished, computed = self.loop.step(admitted)
        except Exception as e:  # the decoder's state is unknown now: fail its sequences, keep serving
            log.exception("decode step failed")
            for s in seqs:
                s.request.fail(ForwardFailed(f"generation failed: {type(e).__name__}: {e}"))
            self.loop.clear()
            return
        rate = computed / max(time.perf_counter() - t0, 1e-6)
        self.tokens_per_s = 0.8 * self.tokens_per_s + 0.2 * rate if self.tokens_per_s else rate
        made = {id(s): len(s.tokens) - before[id(s)] for s in seqs}
        with self._lock:
            for s in seqs:
                if s.request.client_id in self.served:
                    self.served[s.request.client_id] += made[id(s)]
            active = set(self.queues) | {s.request.client_id for s in self.loop.running}
            for cid in [c for c in self.served if c not in active]:
                del self.served[cid]  # gone idle: a returning client starts level, not with credit
        for s in finished:
            self._deliver(s)
        if self.metrics is not None:
            self.metrics.gen_tokens.inc(sum(made.values()))

    def _run_one(self, s: GenSeq) -> None:
        r, p = s.request, s.request.params
        if r.cancelled.is_set():
            return
        try:
            (c,) = self.backend.generate([s.prompt], r.max_new_tokens, p.temperature, p.top_p, p.seed,
                                         sorted(r.stop_token_ids))
        except Exception as e:
            log.exception("generate failed for prompt %d of request %s", s.index, r.request_id)
            r.fail(ForwardFailed(f"generation failed: {type(e).__name__}: {e}"))
            return
        s.tokens, s.finish_reason = list(c.token_ids), c.finish_reason
        if self.metrics is not None:
            self.metrics.gen_tokens.inc(len(s.tokens))
        self._deliver(s)

    def _deliver(self, s: GenSeq) -> None:
        r = s.request
        if r.cancelled.is_set():
            return
        if self.metrics is not None and s.first_token_at:
            self.metrics.gen_ttft_seconds.observe(s.first_token_at - r.submitted_at)
            if len(s.tokens) > 1:
                self.metrics.gen_tpot_seconds.observe((time.monotonic() - s.first_token_at) / (len(s.tokens) - 1))
        r.results.put((s.index, Completion(token_ids=list(s.tokens), finish_reason=s.finish_reason)))
