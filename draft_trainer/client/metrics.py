"""Prometheus metrics of the client's data path (prefix specrelay_trainer_: the trainer is its main user).

`PoolMetrics` is what the pool and the dispatcher record; the trainer's `TrainerMetrics`
(draft_trainer/metrics.py) extends it with the training metrics, in one registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.metrics import TIME_BUCKETS, new_registry

P = "specrelay_trainer_"

ENDPOINT_STATES = ("joining", "up", "down", "refused", "draining")


class PoolMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
        r = self.registry
        self.inflight_tokens = Gauge(P + "inflight_tokens", "Tokens requested from target servers, not yet received",
                                     registry=r)
        self.buffered_tokens = Gauge(P + "buffered_tokens", "Tokens dispatched and not yet consumed by the trainer "
                                     "(in flight + reorder buffer)", registry=r)
        self.endpoint_inflight_tokens = Gauge(P + "endpoint_inflight_tokens", "Tokens in flight per target server",
                                              ["endpoint"], registry=r)
        self.endpoints = Gauge(P + "endpoints", "Target servers by state", ["state"], registry=r)
        self.requests = Counter(P + "requests", "Feature requests by outcome", ["status"], registry=r)
        self.request_seconds = Histogram(P + "request_seconds", "Feature request latency (successful requests)",
                                         buckets=TIME_BUCKETS, registry=r)
        self.retries = Counter(P + "retries", "Samples sent again, by reason", ["reason"], registry=r)
        self.failovers = Counter(P + "failovers", "Target servers marked down after a failed request", registry=r)
        self.hedges = Counter(P + "hedges", "Slow requests also sent to another server", registry=r)
        self.samples_dispatched = Counter(P + "samples_dispatched", "Samples sent to a target server (first time)",
                                          registry=r)

    def set_endpoint_states(self, counts: dict[str, int]) -> None:
        for state in ENDPOINT_STATES:
            self.endpoints.labels(state=state).set(counts.get(state, 0))
