"""Prometheus helpers shared by the target server and the trainer."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)

# Seconds-scale buckets for forward passes and steps (1 ms .. ~2 min).
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
# Token-count buckets for batch sizes (16 .. 1M tokens).
TOKEN_BUCKETS = tuple(16 * 4**i for i in range(11))


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int | None:
    """Expose /metrics on host:port (port 0 = disabled). Returns the bound port."""
    if port is None or port < 0:
        return None
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
