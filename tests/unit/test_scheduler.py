"""The batching scheduler with the real synthetic backend (no wire): fairness, budget, bounded
queue, deadlines, cancellation, drain, and isolation of a failing sample."""

from __future__ import annotations

import queue
import time

import pytest

from common import status
from target_server.backends.synthetic import SyntheticBackend
from target_server.metrics import ServerMetrics
from target_server.scheduler import (DeadlineExceeded, Draining, ForwardFailed, Overloaded, Request, Scheduler)


class RecordingBackend(SyntheticBackend):
    """The synthetic backend, recording each forward's sequences (and, to test fault isolation,
    failing any forward that contains `poison`: a real model cannot be made to fail on demand
    once requests are validated)."""

    def __init__(self, poison: int | None = None, **kw) -> None:
        super().__init__(hidden_size=8, num_layers=8, vocab_size=512, **kw)
        self.calls: list[tuple[list[list[int]], str]] = []
        self.poison = poison

    def decoder(self):
        dec = super().decoder()
        prefill, self.prefills = dec.prefill, []

        def recording_prefill(prompts):
            self.prefills.append([list(p) for p in prompts])
            return prefill(prompts)

        dec.prefill = recording_prefill
        return dec

    def forward(self, seqs, teacher, topk=0):
        self.calls.append(([list(s) for s in seqs], teacher))
        if self.poison is not None and any(self.poison in s for s in seqs):
            raise RuntimeError("poisoned sample")
        return super().forward(seqs, teacher, topk)


def req(client: str, lengths: list[int], *, rid: str = "", teacher: str = "hidden", topk: int = 0,
        deadline: float = 0.0, token: int = 1) -> Request:
    seqs = [[token] * n for n in lengths]
    return Request(request_id=rid or f"{client}-{time.monotonic_ns()}", client_id=client,
                   sample_ids=list(range(len(seqs))), seqs=seqs, teacher=teacher, topk=topk, deadline=deadline)


def collect(r: Request, timeout: float = 30.0) -> list:
    out = []
    while len([x for x in out if not isinstance(x, BaseException)]) < len(r.seqs):
        item = r.results.get(timeout=timeout)
        out.append(item)
        if isinstance(item, BaseException):
            break
    return out


def wait_idle(s: Scheduler, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not s.idle:
        assert time.monotonic() < end, "scheduler did not go idle"
        time.sleep(0.01)


def run_all(s: Scheduler, *reqs: Request) -> list[list]:
    """Submit, start the worker, collect every request's results, stop."""
    for r in reqs:
        s.submit(r)
    s.start()
    try:
        return [collect(r) for r in reqs]
    finally:
        s.stop()


def test_fair_in_tokens_between_clients_with_different_sample_lengths():
    be = RecordingBackend()
    s = Scheduler(be, max_batch_tokens=256, max_queue_tokens=1 << 20)
    # Client "long" sends 64-token samples (2048 tokens), client "short" 16-token samples (1024).
    # Passes hold up to 4 long samples; alternating samples would serve tokens 4:1.
    longs = [req("long", [64] * 4, token=7) for _ in range(8)]
    shorts = [req("short", [16] * 16, token=9) for _ in range(4)]
    for i, r in enumerate(longs):
        s.submit(r)
        if i < len(shorts):
            s.submit(shorts[i])
    s.start()
    try:
        for r in longs + shorts:
            assert len(collect(r)) == len(r.seqs)
    finally:
        s.stop()
    served = {7: 0, 9: 0}
    worst = 0
    for seqs, _ in be.calls:
        for sq in seqs:
            served[sq[0]] += len(sq)
        if served[9] < 1024:  # both clients still had work queued
            worst = max(worst, abs(served[7] - served[9]))
    assert served == {7: 2048, 9: 1024}
    assert worst <= 256 + 64, f"token gap between clients reached {worst}"
    # Every pass respects the padded budget (B x longest T).
    for seqs, _ in be.calls:
        assert len(seqs) * max(map(len, seqs)) <= 256


def test_batches_never_mix_teacher_modes_and_all_samples_arrive():
    be = RecordingBackend()
    s = Scheduler(be, max_batch_tokens=256, max_queue_tokens=1 << 20)
    ra, rb = run_all(s, req("a", [8, 8, 8]), req("b", [8, 8], teacher="topk", topk=4))
    assert sorted(i for i, _ in ra) == [0, 1, 2] and sorted(i for i, _ in rb) == [0, 1]
    assert all(cap.topk_ids_TK.shape == (8, 4) for _, cap in rb)
    assert all(cap.teacher_TH is not None for _, cap in ra)
    assert len(be.calls) == 2 and {t for _, t in be.calls} == {"hidden", "topk"}


def test_bounded_queue_refuses_with_retry_hint_and_counts_tokens():
    be = RecordingBackend()
    s = Scheduler(be, max_batch_tokens=64, max_queue_tokens=100)  # worker not started: the queue fills
    s.submit(req("a", [40]))
    s.submit(req("b", [40]))
    with pytest.raises(Overloaded) as ei:
        s.submit(req("c", [40]))
    e = ei.value
    assert e.code == status.RESOURCE_EXHAUSTED and 0.05 <= e.retry_after_s <= 10.0
    assert "80 tokens queued" in str(e) and "limit 100" in str(e)
    assert s.queued_tokens == 80
    s.submit(req("d", [20]))  # still fits exactly
    assert s.queued_tokens == 100
    s.stop()


def test_deadlines_refuse_late_requests_and_drop_expired_work():
    be = RecordingBackend(cost_per_token_us=20000)  # 20 ms per token: the first pass takes ~1.3 s
    s = Scheduler(be, max_batch_tokens=64, max_queue_tokens=1 << 20)
    with pytest.raises(DeadlineExceeded):
        s.submit(req("a", [4], deadline=time.time() - 1))
    blocker = req("a", [64])
    late = req("b", [8, 8], deadline=time.time() + 0.3)
    s.submit(blocker)
    s.start()
    time.sleep(0.1)  # the worker has taken the blocker
    s.submit(late)
    try:
        out = collect(late)
        assert isinstance(out[-1], DeadlineExceeded), out
        assert len(collect(blocker)) == 1
        assert s.drain(30)
    finally:
        s.stop()
    assert s.queued_tokens == 0
    assert all(8 not in map(len, seqs) for seqs, _ in be.calls), "expired samples must not be computed"


def test_cancel_purges_queued_work_at_once():
    s = Scheduler(RecordingBackend(), max_batch_tokens=64, max_queue_tokens=1000)
    a, b = req("a", [50, 50]), req("b", [30])
    s.submit(a)
    s.submit(b)
    assert s.cancel(a) == 2
    assert s.queued_tokens == 30
    s.submit(req("c", [900]))  # the space is usable again
    s.stop()


def test_a_failing_sample_fails_only_its_request():
    be = RecordingBackend(poison=13)
    s = Scheduler(be, max_batch_tokens=256, max_queue_tokens=1 << 20)
    rg, rb = run_all(s, req("good", [8, 8], token=2), req("bad", [8], token=13))
    assert sorted(i for i, _ in rg) == [0, 1]
    assert isinstance(rb[-1], ForwardFailed) and "poisoned" in str(rb[-1])
    assert len(be.calls[0][0]) == 3  # one packed pass first, then one sample at a time


def test_drain_finishes_queued_work_and_refuses_new():
    be = RecordingBackend(cost_per_token_us=2000)
    s = Scheduler(be, max_batch_tokens=64, max_queue_tokens=1 << 20)
    r = req("a", [32] * 4)
    s.submit(r)
    s.start()
    try:
        assert s.drain(60)
        with pytest.raises(Draining):
            s.submit(req("b", [4]))
        assert len(collect(r, timeout=1)) == 4
    finally:
        s.stop()


def test_stop_fails_queued_requests_with_unavailable():
    s = Scheduler(RecordingBackend(), max_batch_tokens=64, max_queue_tokens=1000)
    r = req("a", [10, 10])
    s.submit(r)
    s.stop()
    item = r.results.get(timeout=1)
    assert isinstance(item, Draining) and item.code == status.UNAVAILABLE
    with pytest.raises(queue.Empty):
        r.results.get(timeout=0.05)


def test_metrics_observe_batches_and_queue():
    m = ServerMetrics()
    s = Scheduler(RecordingBackend(), max_batch_tokens=64, max_queue_tokens=1000, metrics=m)
    r = req("a", [10, 20])
    s.submit(r)
    assert m.registry.get_sample_value("specrelay_target_queue_tokens") == 30
    s.start()
    try:
        collect(r)
        assert s.drain(30)
    finally:
        s.stop()
    assert m.registry.get_sample_value("specrelay_target_tokens_total") == 30
    assert m.registry.get_sample_value("specrelay_target_padded_tokens_total") == 40
    assert m.registry.get_sample_value("specrelay_target_batches_total") == 1
    assert m.registry.get_sample_value("specrelay_target_queue_tokens") == 0
    assert m.registry.get_sample_value("specrelay_target_queue_wait_seconds_count") == 2


def test_computed_but_unsent_features_count_against_the_bound():
    """A slow reader's computed features stay in memory: they count until its stream releases them."""
    s = Scheduler(RecordingBackend(), max_batch_tokens=64, max_queue_tokens=100)
    slow = req("slow", [30, 30])
    s.submit(slow)
    s.start()
    try:
        assert len(collect(slow)) == 2
        wait_idle(s)
        assert s.queued_tokens == 0 and s.held_tokens == 60  # nothing released by a stream yet
        with pytest.raises(Overloaded, match="60 computed and unsent"):
            s.submit(req("other", [50]))
        s.release(slow, 30)  # the stream sent one sample
        assert s.held_tokens == 30
    finally:
        s.stop()
    s2 = Scheduler(RecordingBackend(), max_batch_tokens=64, max_queue_tokens=100)
    r = req("a", [40])
    s2.submit(r)
    s2.start()
    try:
        collect(r)
        wait_idle(s2)
        assert s2.held_tokens == 40
        s2.cancel(r)  # the stream closed: everything it held is released
        assert s2.held_tokens == 0
    finally:
        s2.stop()


# ---------------------------------------------------------------- generation as a request kind
from target_server.generation import GenRequest  # noqa: E402
from tests.support.gen import collect as gen_results  # noqa: E402


def test_feature_requests_are_served_while_a_long_generation_runs():
    """Fair in device time between kinds: a feature request submitted behind a long generation
    finishes while that generation is still decoding (not after it)."""
    be = RecordingBackend(cost_per_token_us=2000)
    s = Scheduler(be, max_batch_tokens=4096, max_queue_tokens=1 << 20)
    s.start()
    try:
        g = GenRequest("g", "regen", [[1, 2, 3]] * 8, max_new_tokens=200)
        s.submit_generate(g)
        end = time.monotonic() + 30
        while not s._loop.running and time.monotonic() < end:
            time.sleep(0.005)
        f = req("trainer", [64, 64])
        s.submit(f)
        assert all(not isinstance(x, BaseException) for x in collect(f))
        assert g.results.qsize() == 0 and s._loop.running, "the generation finished first: features waited for it"
        assert all(len(c.token_ids) == 200 for c in gen_results(g, timeout=60).values())
    finally:
        s.stop()


def test_generation_is_fair_between_clients_and_drains():
    be = RecordingBackend()
    # Budget for two sequences at a time: 2 x (3 + 20) = 46 <= 50 < 3 x 23.
    s = Scheduler(be, max_batch_tokens=50, max_queue_tokens=1 << 20)
    a = GenRequest("a", "A", [[1, 2, 3]] * 4, max_new_tokens=20)
    b = GenRequest("b", "B", [[4, 5, 6]], max_new_tokens=20)
    s.submit_generate(a)
    s.submit_generate(b)
    s.start()
    try:
        assert s.drain(timeout=30)
        assert len(gen_results(a)) == 4 and len(gen_results(b)) == 1
        # B's one sequence joined with A's first one, not after all four of A's; then A's in pairs.
        assert be.prefills[0] == [[1, 2, 3], [4, 5, 6]]
        assert sum(len(p) for p in be.prefills) == 5 and max(len(p) for p in be.prefills) == 2
        with pytest.raises(Draining):
            s.submit_generate(GenRequest("c", "C", [[1]], max_new_tokens=2))
    finally:
        s.stop()


def test_cancelled_generation_leaves_the_batch_and_the_queue():
    be = RecordingBackend(cost_per_token_us=1000)
    s = Scheduler(be, max_batch_tokens=64, max_queue_tokens=1 << 20)
    r = GenRequest("a", "A", [[1, 2, 3]] * 6, max_new_tokens=400)
    s.submit_generate(r)
    s.start()
    try:
        end = time.monotonic() + 30
        while not s._loop.running and time.monotonic() < end:
            time.sleep(0.01)
        s.cancel_generate(r)
        wait_idle(s)
        assert s.queued_tokens == 0 and not s._loop.running
    finally:
        s.stop()


def test_generation_reservations_stay_within_the_backends_kv_budget():
    """A backend whose KV cache holds fewer tokens than --max-batch-tokens beside its feature
    passes (sglang: SGLang's memory profile) bounds the running generations, not the flag."""

    class SmallCache(RecordingBackend):
        def generation_kv_budget(self):
            return 50  # two sequences of 3 + 20 tokens

    be = SmallCache()
    s = Scheduler(be, max_batch_tokens=4096, max_queue_tokens=1 << 20)
    r = GenRequest("a", "A", [[1, 2, 3]] * 6, max_new_tokens=20)
    s.submit_generate(r)
    s.start()
    try:
        assert s.drain(timeout=30)
        assert len(gen_results(r)) == 6
        assert max(len(p) for p in be.prefills) == 2 and sum(len(p) for p in be.prefills) == 6
    finally:
        s.stop()
