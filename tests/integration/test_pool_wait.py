"""The pool's start-up wait: logged with each endpoint's reason, a TLS server dialled in plaintext
is named as such, and the wait ends on a stop event or close() instead of running out its timeout."""

from __future__ import annotations

import logging
import socket
import threading

import pytest

from common.errors import TargetUnavailableError
from draft_trainer.client import pool as pool_mod
from draft_trainer.client.config import PoolConfig
from draft_trainer.client.discovery import EndpointSource
from draft_trainer.client.pool import TargetPool
from tests.support.procs import start_server
from tests.support.tls import self_signed_cert


def _dead_endpoint() -> str:
    with socket.socket() as s:  # a port nothing listens on (bound, then released)
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_wait_is_logged_with_each_endpoints_reason(monkeypatch, caplog):
    monkeypatch.setattr(pool_mod, "WAIT_LOG_FIRST_S", 0.0)
    dead = _dead_endpoint()
    pool = TargetPool(EndpointSource(dead), PoolConfig(endpoints=dead, startup_timeout_s=1.5))
    with caplog.at_level(logging.WARNING, logger="draft_trainer.client.pool"), pytest.raises(TargetUnavailableError):
        pool.start()
    waits = [r.getMessage() for r in caplog.records if "waiting for target servers" in r.getMessage()]
    assert waits and dead in waits[0] and "down" in waits[0], waits


@pytest.mark.parametrize("how", ["stop_event", "close"])
def test_wait_ends_on_stop(how):
    dead = _dead_endpoint()
    pool = TargetPool(EndpointSource(dead), PoolConfig(endpoints=dead, startup_timeout_s=300))
    stop, out = threading.Event(), {}

    def run():
        try:
            pool.start(stop=stop)
        except TargetUnavailableError as e:
            out["error"] = str(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(0.5)
    stop.set() if how == "stop_event" else pool.close()
    t.join(20)
    assert not t.is_alive(), "the start-up wait did not end when stopped"
    assert "stopped while waiting" in out["error"] and dead in out["error"]


def test_tls_server_dialled_in_plaintext_is_named(tmp_path):
    cert, key = self_signed_cert(tmp_path)
    srv = start_server(tmp_path, "--backend", "synthetic", "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        pool = TargetPool(EndpointSource(srv.endpoint), PoolConfig(endpoints=srv.endpoint, startup_timeout_s=2))
        with pytest.raises(TargetUnavailableError, match="this server speaks TLS: set targets.tls_root_cert"):
            pool.start()
    finally:
        srv.stop()


@pytest.mark.parametrize("slow_start", [True, False])
def test_a_joined_servers_window_starts_small_or_full(tiny_llama, tmp_path, slow_start):
    """Slow start (features: spread the first batches over all servers) or a full window at once
    (generation, where one round trip is a whole answer: regenerate turns slow start off)."""
    srv = start_server(tmp_path, "--model", str(tiny_llama), "--backend", "hf", "--dtype", "fp32")
    try:
        pool = TargetPool(EndpointSource(srv.endpoint), PoolConfig(endpoints=srv.endpoint, slow_start=slow_start,
                                                                   max_endpoint_inflight_tokens=5000))
        pool.start()
        try:
            [ep] = list(pool.endpoints.values())
            assert ep.window_tokens == (1 if slow_start else 5000)
        finally:
            pool.close()
    finally:
        srv.stop()


def test_regenerate_turns_slow_start_off():
    from draft_trainer.regenerate import RegenerateConfig

    cfg = RegenerateConfig(targets=["127.0.0.1:1"], input="x", output="y", batch_size=8, concurrency=6,
                           max_new_tokens=100).pool_config()
    assert cfg.slow_start is False and cfg.max_endpoint_inflight_tokens == 6 * cfg.request_tokens
