"""The dispatcher's pure decision rules (draft_trainer/client/balance.py), one by one."""

from __future__ import annotations

from draft_trainer.client import balance as b
from draft_trainer.client.pool import Endpoint

NOW = 1000.0


def ep(name, inflight=0, spt=None, window=10_000, idle_s=0.0, failures=0, last_used=0.0) -> Endpoint:
    return Endpoint(name, window_tokens=window, inflight_tokens=inflight, sec_per_token=spt,
                    idle_since=NOW - idle_s, failures=failures, last_used=last_used)


def test_speed_estimate_unmeasured_busy_and_fading():
    assert b.speed_estimate(ep("new"), best_spt=2e-3, now=NOW) == 2e-3
    assert b.speed_estimate(ep("busy", inflight=5, spt=1e-2), 1e-3, NOW) == 1e-2
    just_idle = b.speed_estimate(ep("idle", spt=1e-2, idle_s=0.0), 1e-3, NOW)
    long_idle = b.speed_estimate(ep("idle", spt=1e-2, idle_s=60.0), 1e-3, NOW)
    assert abs(just_idle - 1e-2) < 1e-12 and 1e-3 < long_idle < 1.01e-3


def test_choose_ties_break_on_failures_then_last_used():
    a, c = ep("a", failures=1, last_used=1.0), ep("c", failures=0, last_used=5.0)
    assert b.choose([a, c], 10, 10, set(), NOW) is c
    d, e = ep("d", last_used=9.0), ep("e", last_used=3.0)
    assert b.choose([d, e], 10, 10, set(), NOW) is e
    assert b.choose([], 10, 10, set(), NOW) is None


def test_choose_needs_room_for_a_full_request_unless_idle():
    full = ep("full", inflight=900, window=1000)
    assert b.choose([full], 50, 200, set(), NOW) is None       # 900 + 200 > 1000
    assert b.choose([full], 50, 100, set(), NOW) is full        # 900 + 100 fits
    assert b.choose([ep("idle", window=1)], 50, 200, set(), NOW) is not None


def test_request_cap_takes_the_smallest_bound():
    assert b.request_cap(4096, 0, 10_000, 10_000) == 4096
    assert b.request_cap(4096, 1000, 10_000, 10_000) == 1000
    assert b.request_cap(4096, 0, 300, 10_000) == 300
    assert b.request_cap(4096, 0, 10_000, 50) == 50
    assert b.request_cap(4096, 0, -5, 10_000) == 0


def test_fits_by_tokens_and_items():
    assert b.fits(100, 3, 50, 150, 10) and not b.fits(100, 3, 51, 150, 10)
    assert not b.fits(0, 256, 1, 10_000, 256)


def test_overdue_and_hedge_target():
    assert b.overdue_after(2.0, 0.1) == 2.0 and b.overdue_after(2.0, 1.0) == 4.0
    busy, light, tiny = ep("busy", inflight=500, window=600), ep("light", inflight=10), ep("tiny", window=10)
    assert b.hedge_target([busy, light], 200) is light
    assert b.hedge_target([busy], 200) is None                  # no room
    assert b.hedge_target([tiny], 200) is tiny                  # an empty window still takes one request


def test_windows_and_speed_folding():
    assert b.grown_window(1, 64, 1000) == 65 and b.grown_window(900, 200, 1000) == 1000
    assert b.shrunk_window(100) == 50 and b.shrunk_window(1) == 1
    assert b.folded_speed(None, 2.0, 100, False) == 0.02
    assert abs(b.folded_speed(0.01, 2.0, 100, False) - (0.7 * 0.01 + 0.3 * 0.02)) < 1e-12
    assert b.folded_speed(0.05, 2.0, 100, True) == 0.05 and b.folded_speed(0.01, 2.0, 100, True) == 0.02


def test_endpoint_owns_its_accounting():
    e = ep("x", window=100)
    e.carry(40, NOW)
    e.sent(NOW)
    assert e.inflight_tokens == 40 and e.requests == 1 and e.last_used == NOW
    e.carry(-40, NOW + 5)
    assert e.inflight_tokens == 0 and e.idle_since == NOW + 5
    e.throttled(0.5, NOW)
    assert e.not_before == NOW + 0.5 and e.window_tokens == 50
    e.failures = 3
    e.request_ok(30, 1000)
    assert e.failures == 0 and e.window_tokens == 80
    e.observe_speed(1.0, 100)          # the first answer after a join warms up, untimed
    assert e.sec_per_token is None and e.warm
    e.observe_speed(1.0, 100)
    assert e.sec_per_token == 0.01


def test_endpoint_counts_idle_time_between_requests_only():
    e = ep("x")
    e.idle_since = 0.0
    e.carry(10, NOW)                 # the first request: no idle time before it is counted
    e.carry(-10, NOW + 1)
    e.carry(5, NOW + 4)              # 3 s with nothing in flight
    e.carry(5, NOW + 6)              # still busy: nothing added
    assert e.idle_total_s == 3.0


def test_window_holds_no_more_than_half_a_deadline_of_work():
    # unmeasured: the configured window; 1 ms per token and a 4 s deadline: 2,000 tokens
    assert b.deadline_window(16384, None, 4.0) == 16384
    assert b.deadline_window(16384, 1e-3, 4.0) == 2000
    assert b.deadline_window(1000, 1e-3, 4.0) == 1000            # the configured bound still holds
    assert b.deadline_window(16384, 10.0, 4.0) == 1               # slower than the deadline: one sample at a time
    e = ep("slow", window=1500, spt=1e-3)
    for _ in range(5):                                            # answers grow the window only up to the cap ...
        e.request_ok(1000, b.deadline_window(16384, e.sec_per_token, 4.0))
    assert e.window_tokens == 2000
    e.sec_per_token = 4e-3                                        # ... and a server found slower shrinks it
    e.request_ok(1000, b.deadline_window(16384, e.sec_per_token, 4.0))
    assert e.window_tokens == 500
