"""The target pool: which servers exist, which of them are usable, and their model contract.

    pool = TargetPool(EndpointSource("file:/etc/targets"), cfg.targets, metrics=m)
    pool.start()                   # handshake; ContractError / TargetUnavailableError before training
    pool.info                      # the ModelInfo every usable server agrees on
    ...                            # the dispatcher (dispatcher.py) sends requests to pool.usable()
    pool.close()

Endpoint life cycle (a monitor thread drives it; requests report failures with `mark_down`):

    joining --handshake ok--> up --request fails / times out / server gone--> down
    down --probe (backoff 0.25 s .. probe_max_backoff_s) ok--> up
    joining/down --contract mismatch or bad credentials--> refused (kept out, re-checked rarely)
    any --no longer listed by discovery--> draining (no new work; removed once idle)

Every probe builds a fresh client: a restarted server may have a new Flight port, and a fresh
gRPC channel does not inherit a dead channel's reconnect backoff. Contract checks run on every
(re)join, so a server restarted with another model is refused instead of poisoning the run.
The pool and the dispatcher share one condition variable (`cv`), which guards all endpoint state;
network calls never run under it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from common import status
from common.contract import ModelInfo, check_compatible
from common.errors import ConfigError, ContractError, SpecRelayError, TargetUnavailableError
from draft_trainer.client.discovery import EndpointSource
from draft_trainer.client.target import TargetClient, speaks_tls
from draft_trainer.client.balance import deadline_window, folded_speed, grown_window, shrunk_window
from draft_trainer.client.config import PoolConfig
from draft_trainer.client.metrics import ENDPOINT_STATES, PoolMetrics

log = logging.getLogger(__name__)

JOINING, UP, DOWN, REFUSED, DRAINING = ENDPOINT_STATES
AUTH_HINT = ("Give the trainer the servers' token (targets.auth_token_file) and, for TLS, the root that signed "
             "their certificate (targets.tls_root_cert).")
TLS_HINT = "this server speaks TLS: set targets.tls_root_cert (the PEM root that signed its certificate)"
PROBE_BASE_S = 0.25
HANDSHAKE_TIMEOUT_S = 5.0
WAIT_LOG_FIRST_S = 2.0   # while no server is up at start-up: first log line after this long,
WAIT_LOG_EVERY_S = 15.0  # then this often, with each endpoint's reason
R = TypeVar("R")


def _unauthenticated(res: object) -> bool:
    return isinstance(res, Exception) and status.classify(res).code == status.UNAUTHENTICATED


@dataclass(eq=False)  # identity: endpoints are hashed and compared by object
class Endpoint:
    address: str
    # Current per-endpoint window: starts at one sample, grows by each answered request's size
    # (doubling per round trip, like TCP slow start) up to max_endpoint_inflight_tokens (and to what
    # the server computes in half the request deadline, once its speed is measured), halves on
    # RESOURCE_EXHAUSTED. Starting small spreads the first batches over all servers: the server
    # computes what it holds in one forward pass, so a full window up front would delay the first
    # sample by the whole window's compute time.
    window_tokens: int = 1
    state: str = JOINING
    client: TargetClient | None = None
    info: ModelInfo | None = None
    inflight_tokens: int = 0
    not_before: float = 0.0            # RESOURCE_EXHAUSTED: send nothing before this (monotonic)
    failures: int = 0                  # consecutive failed requests/probes (probe backoff)
    next_probe: float = 0.0
    probing: bool = False
    last_error: str = ""
    last_used: float = 0.0
    retired: list[TargetClient] = field(default_factory=list)  # replaced clients, closed once idle
    sec_per_token: float | None = None  # measured: request time / (tokens ahead of it there + its own)
    warm: bool = False                 # the first answer after a (re)join is not timed (process warm-up)
    idle_since: float = 0.0            # when its last token in flight came back (monotonic)
    idle_total_s: float = 0.0          # time with nothing in flight here, between requests (not before the first)
    requests: int = 0
    samples: int = 0
    errors: int = 0

    # Accounting: the endpoint is the one owner of its numbers; callers hold the pool's cv.
    def carry(self, tokens: int, now: float) -> None:
        """`tokens` more in flight here (negative: answered or given up)."""
        if self.inflight_tokens == 0 and tokens > 0 and self.idle_since:
            self.idle_total_s += now - self.idle_since
        self.inflight_tokens += tokens
        if self.inflight_tokens == 0:
            self.idle_since = now

    def sent(self, now: float) -> None:
        self.requests += 1
        self.last_used = now

    def answered(self) -> None:
        self.samples += 1

    def request_ok(self, tokens: int, max_window: int) -> None:
        self.failures = 0
        self.window_tokens = grown_window(self.window_tokens, tokens, max_window)

    def throttled(self, retry_after_s: float | None, now: float) -> None:
        """RESOURCE_EXHAUSTED: nothing before the server's retry hint, and half the window."""
        self.not_before = now + (retry_after_s if retry_after_s is not None else 0.2)
        self.window_tokens = shrunk_window(self.window_tokens)

    def observe_speed(self, seconds: float, tokens: int, *, at_least: bool = False) -> None:
        """Fold one request's time per token (its own tokens plus those queued ahead of it) into
        the estimate; `at_least` (a timeout) only ever makes the estimate slower."""
        if not self.warm and not at_least:
            self.warm = True  # a fresh process's first batch includes one-off start-up costs
            return
        self.sec_per_token = folded_speed(self.sec_per_token, seconds, tokens, at_least)

    def summary(self) -> dict[str, Any]:
        rate = None if not self.sec_per_token else 1.0 / self.sec_per_token
        return {"state": self.state, "requests": self.requests, "samples": self.samples, "errors": self.errors,
                "tokens_per_s": None if rate is None else round(rate, 1), "last_error": self.last_error[:300]}


class TargetPool:
    def __init__(self, source: EndpointSource, cfg: PoolConfig, *, expected: ModelInfo | None = None,
                 expected_name: str = "the run", metrics: PoolMetrics | None = None,
                 client_kwargs: dict[str, Any] | None = None, client_id: str | None = None,
                 auth_hint: str = AUTH_HINT, tls_hint: str = TLS_HINT) -> None:
        self.source = source
        self.cfg = cfg
        self.metrics = metrics or PoolMetrics()
        self.client_kwargs = dict(client_kwargs or {})   # passed through to TargetClient (auth, TLS, ...)
        self.client_id = client_id or uuid.uuid4().hex[:12]
        self.auth_hint = auth_hint  # how the command in use takes a token and a TLS root
        self.tls_hint = tls_hint
        self._stop = threading.Event()  # close() (e.g. from a signal handler) ends a start-up wait
        self.cv = threading.Condition()
        self.endpoints: dict[str, Endpoint] = {}
        self.info: ModelInfo | None = expected
        self._ref_name = expected_name
        self._closed = False
        self._next_refresh = 0.0
        self._monitor: threading.Thread | None = None

    # ---------------------------------------------------------------- start-up
    def start(self, stop: threading.Event | None = None) -> ModelInfo:
        """Handshake with the listed servers; returns the agreed ModelInfo.

        Every server reachable now must agree with the run (or, for a new run, with the first of
        them), else ContractError naming both values. Servers not reachable yet join later.
        While none is up, the wait is logged with each endpoint's reason, and it ends early
        (TargetUnavailableError) when `stop` is set or the pool is closed.
        """
        cfg = self.cfg
        t0 = time.monotonic()
        deadline = t0 + cfg.startup_timeout_s
        next_log = t0 + WAIT_LOG_FIRST_S
        delay = PROBE_BASE_S
        resolve_error = ""
        while True:
            try:
                listed = self.source.resolve()
            except ConfigError as e:
                if not self.source.dynamic:
                    raise
                # A headless Service has no records until a pod is ready: keep asking until the deadline.
                listed, resolve_error = set(), f"\n  {e}"
            for addr in listed:
                self.endpoints.setdefault(addr, Endpoint(addr))
            pending = [ep for ep in self.endpoints.values() if ep.state in (JOINING, DOWN)]
            results = self._handshake_all([ep.address for ep in pending])
            ok = {a: r for a, r in results.items() if isinstance(r[1], ModelInfo)}
            denied = [f"{a}: {r[1]}" for a, r in sorted(results.items()) if _unauthenticated(r[1])]
            if denied:
                for client, _ in ok.values():
                    client.close()
                raise ConfigError("target servers rejected this client's credentials (before any work):\n  "
                                  + "\n  ".join(denied) + f"\n{self.auth_hint}")
            for addr, (client, res) in results.items():
                if not isinstance(res, ModelInfo):
                    ep = self.endpoints[addr]
                    ep.state, ep.last_error, ep.next_probe = DOWN, str(res), time.monotonic() + PROBE_BASE_S
            if ok:
                self._agree_initial(ok)
                break
            now = time.monotonic()
            if now + delay > deadline:
                raise TargetUnavailableError(
                    f"no target server reachable at {self.source.spec} after {cfg.startup_timeout_s:.0f}s "
                    f"(targets.startup_timeout_s):\n  " + self.describe() + resolve_error
                    + "\nStart the servers, or check the address and that the port is the gRPC port.")
            if now >= next_log:
                log.warning("waiting for target servers (%.0fs of %.0fs, targets.startup_timeout_s):\n  %s%s",
                            now - t0, cfg.startup_timeout_s, self.describe(), resolve_error)
                next_log = now + WAIT_LOG_EVERY_S
            if self._wait_stopped(delay, stop):
                raise TargetUnavailableError(f"stopped while waiting for target servers at {self.source.spec}:\n  "
                                             + self.describe())
            delay = min(delay * 2, 2.0)
        self._next_refresh = time.monotonic() + cfg.refresh_interval_s
        self._publish_states()
        self._monitor = threading.Thread(target=self._monitor_loop, name="pool-monitor", daemon=True)
        self._monitor.start()
        return self.info

    def _wait_stopped(self, seconds: float, stop: threading.Event | None) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self._stop.is_set() or (stop is not None and stop.is_set()):
                return True
            self._stop.wait(min(0.1, max(0.0, end - time.monotonic())))
        return self._stop.is_set() or (stop is not None and stop.is_set())

    def _agree_initial(self, ok: dict[str, tuple[TargetClient, ModelInfo]]) -> None:
        addrs = sorted(ok)
        if self.info is None:
            self.info = ok[addrs[0]][1]
            self._ref_name = f"server {addrs[0]}"
        problems = []
        for addr in addrs:
            try:
                self._check(addr, ok[addr][1])
            except ContractError as e:
                problems.append(str(e))
        if problems:
            for client, _ in ok.values():
                client.close()
            raise ContractError("target servers disagree on the model contract (before training):\n"
                                + "\n".join(problems))
        with self.cv:
            for addr in addrs:
                self._set_up(self.endpoints[addr], *ok[addr], now=time.monotonic())

    def _check(self, addr: str, info: ModelInfo) -> None:
        check_compatible(self.info, info, expected_name=self._ref_name, actual_name=f"server {addr}",
                         teacher_mode=self.cfg.teacher)
        if self.cfg.teacher == "topk" and self.cfg.topk > info.max_topk:
            raise ContractError(f"targets.topk={self.cfg.topk} but server {addr} offers at most {info.max_topk}")

    # ---------------------------------------------------------------- handshakes
    def _handshake(self, addr: str) -> tuple[TargetClient | None, ModelInfo | Exception]:
        client = None
        try:
            client = TargetClient(addr, client_id=self.client_id,
                                  timeout_s=min(HANDSHAKE_TIMEOUT_S, self.cfg.request_timeout_s), **self.client_kwargs)
            if not client.healthy(timeout_s=HANDSHAKE_TIMEOUT_S):
                raise TargetUnavailableError(f"server {addr} is not serving (unreachable, starting or draining)")
            info = client.model_info(refresh=True)
            # Create the Flight client now, on one thread, before request threads share it.
            client._flight_client()
            return client, info
        except Exception as e:  # any failure means "not usable now"; the message is kept for the operator
            if client is not None:
                client.close()
            if not self.client_kwargs.get("tls_root_cert") and not _unauthenticated(e) and speaks_tls(addr):
                return None, TargetUnavailableError(f"{e} -- {self.tls_hint}")
            return None, e if isinstance(e, SpecRelayError) else TargetUnavailableError(f"{addr}: {type(e).__name__}: {e}")

    def _handshake_all(self, addrs: list[str]) -> dict[str, tuple[TargetClient | None, ModelInfo | Exception]]:
        out: dict[str, Any] = {}
        threads = [threading.Thread(target=lambda a=a: out.__setitem__(a, self._handshake(a)), daemon=True)
                   for a in addrs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    # ---------------------------------------------------------------- state changes (caller holds cv)
    def _set_up(self, ep: Endpoint, client: TargetClient, info: ModelInfo, now: float) -> None:
        if ep.client is not None:
            ep.retired.append(ep.client)
        was = ep.state
        ep.client, ep.info, ep.state = client, info, UP
        ep.not_before = 0.0
        # slow start again (it may be a fresh process), or a full window where round trips are long
        ep.window_tokens = 1 if self.cfg.slow_start else self.cfg.max_endpoint_inflight_tokens
        ep.warm = False
        log.info("target %s %s (%s, flight port %d)", ep.address, "joined" if was == JOINING else "is back up",
                 info.model_name, info.flight_port)
        self._publish_states()
        self.cv.notify_all()

    def _probe_delay(self, ep: Endpoint) -> float:
        return min(self.cfg.probe_max_backoff_s, PROBE_BASE_S * 2 ** max(0, ep.failures - 1))

    def mark_down(self, ep: Endpoint, reason: str) -> bool:
        """A request to `ep` failed: stop sending it work and probe it with backoff. True if it was up."""
        ep.failures += 1
        ep.errors += 1
        ep.last_error = reason
        if ep.state != UP:
            return False
        ep.state = DOWN
        ep.next_probe = time.monotonic() + self._probe_delay(ep)
        self.metrics.failovers.inc()
        log.warning("target %s marked down (%s); its requests go elsewhere, probing in %.2fs", ep.address,
                    reason[:300], ep.next_probe - time.monotonic())
        self._publish_states()
        return True

    def refuse(self, ep: Endpoint, reason: str) -> None:
        """`ep` can never serve this run as it is (wrong model, bad credentials): keep it out, loudly."""
        if ep.state != REFUSED:
            log.error("target %s REFUSED and kept out of the pool: %s", ep.address, reason)
        ep.state, ep.last_error = REFUSED, reason
        ep.errors += 1
        ep.next_probe = time.monotonic() + max(30.0, self.cfg.probe_max_backoff_s)
        self._publish_states()

    def slow_down(self, ep: Endpoint, retry_after_s: float | None) -> None:
        ep.throttled(retry_after_s, time.monotonic())

    def request_ok(self, ep: Endpoint, tokens: int) -> None:
        ep.request_ok(tokens, deadline_window(self.cfg.max_endpoint_inflight_tokens, ep.sec_per_token,
                                              self.cfg.request_timeout_s))

    @staticmethod
    def observe_speed(ep: Endpoint, seconds: float, tokens: int, *, at_least: bool = False) -> None:
        ep.observe_speed(seconds, tokens, at_least=at_least)

    def usable(self, now: float) -> list[Endpoint]:
        return [ep for ep in self.endpoints.values() if ep.state == UP and ep.not_before <= now]

    def num_up(self) -> int:
        return sum(ep.state == UP for ep in self.endpoints.values())

    def _publish_states(self) -> None:
        counts: dict[str, int] = {}
        for ep in self.endpoints.values():
            counts[ep.state] = counts.get(ep.state, 0) + 1
        self.metrics.set_endpoint_states(counts)

    def describe(self) -> str:
        if not self.endpoints:
            return "(discovery returned no endpoints)"
        return "\n  ".join(f"{ep.address}: {ep.state}" + (f" ({ep.last_error[:200]})" if ep.last_error else "")
                           for ep in sorted(self.endpoints.values(), key=lambda e: e.address))

    # ---------------------------------------------------------------- monitor: discovery + probes
    def _monitor_loop(self) -> None:
        while True:
            with self.cv:
                if self._closed:
                    return
                now = time.monotonic()
                refresh = self.source.dynamic and now >= self._next_refresh
            if refresh:
                listed = self.source.resolve()  # outside the lock: DNS may block
                with self.cv:
                    self._apply_listing(listed)
                    self._next_refresh = time.monotonic() + self.cfg.refresh_interval_s
            with self.cv:
                now = time.monotonic()
                for ep in list(self.endpoints.values()):
                    if ep.inflight_tokens == 0 and ep.retired:
                        for c in ep.retired:
                            c.close()
                        ep.retired.clear()
                    if ep.state == DRAINING and ep.inflight_tokens == 0:
                        self._remove(ep)
                    elif ep.state in (JOINING, DOWN, REFUSED) and not ep.probing and ep.next_probe <= now:
                        ep.probing = True
                        threading.Thread(target=self._probe, args=(ep,), name=f"probe-{ep.address}",
                                         daemon=True).start()
                self.cv.wait(timeout=0.1)

    def _apply_listing(self, listed: set[str]) -> None:
        for addr in listed:
            ep = self.endpoints.get(addr)
            if ep is None:
                self.endpoints[addr] = Endpoint(addr)
                log.info("target %s listed by discovery: joining", addr)
            elif ep.state == DRAINING:
                ep.state, ep.next_probe = DOWN, 0.0  # listed again: re-handshake before use
        for addr, ep in self.endpoints.items():
            if addr not in listed and ep.state != DRAINING:
                log.info("target %s no longer listed by discovery: draining (%d tokens in flight)", addr,
                         ep.inflight_tokens)
                ep.state = DRAINING
        self._publish_states()
        self.cv.notify_all()

    def _remove(self, ep: Endpoint) -> None:
        del self.endpoints[ep.address]
        if ep.client is not None:
            ep.client.close()
        try:
            self.metrics.endpoint_inflight_tokens.remove(ep.address)
        except KeyError:  # never carried a request
            pass
        log.info("target %s drained and removed", ep.address)
        self._publish_states()

    def _probe(self, ep: Endpoint) -> None:
        client, res = self._handshake(ep.address)
        with self.cv:
            ep.probing = False
            if self._closed or ep.state == DRAINING or self.endpoints.get(ep.address) is not ep:
                if client is not None:
                    client.close()
                return
            now = time.monotonic()
            if isinstance(res, ModelInfo):
                try:
                    self._check(ep.address, res)
                except ContractError as e:
                    client.close()
                    self.refuse(ep, f"{e}\nFix or remove this server; the run continues without it.")
                    return
                self._set_up(ep, client, res, now)
            elif _unauthenticated(res):
                self.refuse(ep, f"{res}\n{self.auth_hint}")
            else:
                ep.failures += 1
                ep.last_error = str(res)
                if ep.state == REFUSED:  # stays refused until it passes the contract check
                    ep.next_probe = now + max(30.0, self.cfg.probe_max_backoff_s)
                else:
                    ep.state = DOWN
                    ep.next_probe = now + self._probe_delay(ep)
                self._publish_states()

    # ---------------------------------------------------------------- control-plane helpers
    def call_any(self, fn: Callable[[TargetClient], R], what: str) -> R:
        """Run a control-plane call on some usable server, failing over to the others."""
        errors = []
        with self.cv:
            candidates = [ep for ep in self.endpoints.values() if ep.state == UP]
        for ep in sorted(candidates, key=lambda e: e.inflight_tokens):
            try:
                return fn(ep.client)
            except TargetUnavailableError as e:
                errors.append(f"{ep.address}: {e}")
                with self.cv:
                    self.mark_down(ep, str(e))
        raise TargetUnavailableError(f"{what}: no target server could answer:\n  " + "\n  ".join(errors or
                                     ["(no server is up)"]))

    def close(self) -> None:
        self._stop.set()
        with self.cv:
            self._closed = True
            self.cv.notify_all()
            eps = list(self.endpoints.values())
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        for ep in eps:
            for c in [ep.client, *ep.retired]:
                if c is not None:
                    c.close()
