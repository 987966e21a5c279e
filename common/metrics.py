"""Prometheus helpers shared by the target server and the trainer.

`new_registry()` is where both sides' registries start: it carries the process's own metrics
(process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, ...). The
`*_created` series prometheus_client adds to every counter and histogram are turned off for the
process: they doubled the series count and nothing reads them.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, ProcessCollector, disable_created_metrics, start_http_server

log = logging.getLogger(__name__)

disable_created_metrics()

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


def new_registry() -> CollectorRegistry:
    """A registry with the process metrics (RSS, CPU seconds, open and max fds, start time)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


class RegisteredOnFirstSet:
    """A metric that appears in `registry` only once it has a value: a gauge nobody has set yet
    (e.g. an evaluation that never ran) is absent from /metrics, not a misleading 0."""

    def __init__(self, metric, registry: CollectorRegistry) -> None:
        self._metric = metric
        self._registry = registry
        self._registered = False
        self._lock = threading.Lock()

    def set(self, value: float) -> None:
        with self._lock:
            if not self._registered:
                self._registry.register(self._metric)
                self._registered = True
        self._metric.set(value)
