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
