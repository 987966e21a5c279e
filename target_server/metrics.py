"""Prometheus metrics of the target server (prefix specrelay_target_)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from common.contract import ModelInfo
from common.metrics import TIME_BUCKETS, TOKEN_BUCKETS

P = "specrelay_target_"


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(P + "requests", "Feature requests by final status", ["status"], registry=r)
        self.samples = Counter(P + "samples", "Samples served", registry=r)
        self.tokens = Counter(P + "tokens", "Tokens run through forward passes", registry=r)
        self.padded_tokens = Counter(P + "padded_tokens", "Padded tokens computed (B x longest T)", registry=r)
        self.batches = Counter(P + "batches", "Forward passes", registry=r)
        self.batch_tokens = Histogram(P + "batch_tokens", "Tokens per forward pass", buckets=TOKEN_BUCKETS, registry=r)
        self.forward_seconds = Histogram(P + "forward_seconds", "Forward pass wall time", buckets=TIME_BUCKETS, registry=r)
        self.queue_tokens = Gauge(P + "queue_tokens", "Tokens waiting in the scheduler queue", registry=r)
        self.bytes_sent = Counter(P + "bytes_sent", "Feature bytes sent on the data plane", registry=r)
        self.active_streams = Gauge(P + "active_streams", "Feature streams being served", registry=r)
        self.ready = Gauge(P + "ready", "1 when serving, 0 when starting or draining", registry=r)
        self.model = Info(P + "model", "The served model contract", registry=r)

    def set_model(self, info: ModelInfo) -> None:
        self.model.info({
            "model_name": info.model_name, "architecture": info.architecture, "backend": info.backend,
            "hidden_size": str(info.hidden_size), "num_layers": str(info.num_layers),
            "aux_layer_ids": ",".join(map(str, info.aux_layer_ids)), "dtype": info.dtype,
            "server_version": info.server_version,
        })

    def observe_batch(self, num_samples: int, tokens: int, padded_tokens: int, seconds: float) -> None:
        self.batches.inc()
        self.samples.inc(num_samples)
        self.tokens.inc(tokens)
        self.padded_tokens.inc(padded_tokens)
        self.batch_tokens.observe(tokens)
        self.forward_seconds.observe(seconds)
