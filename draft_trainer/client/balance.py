"""The dispatcher's decisions as pure functions of endpoint numbers: which server, how big a
request, when to hedge, how windows and speed estimates move. No locks, no I/O, no clocks
(callers pass `now`), so each rule has its own unit tests (tests/unit/test_balance.py).

An endpoint here is anything with the Endpoint fields these read: inflight_tokens,
window_tokens, sec_per_token, idle_since, failures, last_used.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import TypeVar

E = TypeVar("E")

IDLE_FORGET_S = 5.0  # an idle server's speed estimate fades back to the best server's with this time constant


def speed_estimate(ep, best_spt: float, now: float, forget_s: float = IDLE_FORGET_S) -> float:
    """Seconds per token to expect from `ep`: unmeasured = the best known; an idle server's slow
    verdict fades towards the best (so it is tried again instead of starving on old news)."""
    if not ep.sec_per_token:
        return best_spt
    if ep.inflight_tokens:
        return ep.sec_per_token
    fade = math.exp(-(now - ep.idle_since) / forget_s)
    return best_spt + (ep.sec_per_token - best_spt) * fade


def choose(eps: Sequence[E], tokens: int, want: int, stuck: Collection[E], now: float) -> E | None:
    """The server expected to finish `tokens` soonest: least outstanding tokens weighted by its
    measured time per token. A server needs room for a full-size request (`want`) unless idle.
    The best server with room is taken unless a full one (not `stuck` with an overdue request)
    would finish over twice as soon: then None (wait for it)."""
    if not eps:
        return None
    known = [e.sec_per_token for e in eps if e.sec_per_token]
    best_spt = min(known) if known else 1.0  # unmeasured (new) servers: assume the best, then measure

    def eta(e) -> float:
        return (e.inflight_tokens + tokens) * speed_estimate(e, best_spt, now)

    def order(e):
        return (eta(e), e.failures, e.last_used)

    roomy = [e for e in eps if e.inflight_tokens == 0 or e.inflight_tokens + max(tokens, want) <= e.window_tokens]
    if not roomy:
        return None
    pick = min(roomy, key=order)
    best = min([e for e in eps if e not in stuck] or eps, key=order)
    return pick if pick is best or eta(pick) <= 2 * eta(best) else None


def request_cap(request_tokens: int, server_max_request_tokens: int, window_room: int, total_room: int) -> int:
    """Tokens one request may carry: the configured size, the server's limit, and the room left in
    the endpoint's window and the overall in-flight bound (a request always carries one item)."""
    cap = request_tokens
    if server_max_request_tokens:
        cap = min(cap, server_max_request_tokens)
    return min(cap, max(min(window_room, total_room), 0))


def fits(total: int, count: int, next_tokens: int, cap: int, max_items: int) -> bool:
    """Whether the next pending item joins a request already holding `count` items / `total` tokens."""
    return total + next_tokens <= cap and count < max_items


def overdue_after(hedge_after_s: float, typical_s: float) -> float:
    """A request older than this is late: hedge it, and stop waiting for its server."""
    return max(hedge_after_s, 4 * typical_s)


def hedge_target(others: Sequence[E], tokens: int) -> E | None:
    """Where to send a late request's copy: a server with window room, least loaded first."""
    ok = [e for e in others if e.inflight_tokens + tokens <= max(e.window_tokens, tokens)]
    return min(ok, key=lambda e: (e.inflight_tokens, e.failures, e.last_used), default=None)


def grown_window(window: int, answered_tokens: int, max_window: int) -> int:
    """After an answer: grow by what was answered (doubling per round trip, like TCP slow start)."""
    return min(max_window, window + answered_tokens)


def deadline_window(max_window: int, sec_per_token: float | None, request_timeout_s: float) -> int:
    """The most tokens to keep in flight on one server: `max_window`, and no more than it computes in
    half the request deadline, so that a request queued behind the window still finishes inside its
    own. (A 1-thread fp32 CPU server computes ~130 tokens/s: a full 16,384-token window is two minutes
    of queue, and the demo's requests timed out, were re-sent and recomputed every few minutes.)"""
    if not sec_per_token or request_timeout_s <= 0:
        return max_window
    return max(1, min(max_window, int(request_timeout_s / 2 / sec_per_token)))


def shrunk_window(window: int) -> int:
    """After RESOURCE_EXHAUSTED: halve what is kept in flight there."""
    return max(1, window // 2)


def folded_speed(current: float | None, seconds: float, tokens: int, at_least: bool) -> float:
    """One request's seconds per token folded into the estimate (EWMA); `at_least` (a timeout)
    only ever makes the estimate slower."""
    s = seconds / max(1, tokens)
    if current is None:
        return s
    if at_least:
        return max(current, s)
    return 0.7 * current + 0.3 * s
