"""Prometheus metrics of the target server (prefix specrelay_target_).

Every sample that reaches the server ends in exactly one `samples_total{outcome}` bucket:
served, or dropped with the reason (refused, invalid, deadline, cancelled, unavailable, error).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from common.contract import ModelInfo
from common.metrics import TIME_BUCKETS, TOKEN_BUCKETS, new_registry

P = "specrelay_target_"

# Request statuses (label values of requests_total) and the sample outcome each implies.
REQUEST_STATUSES = ("ok", "invalid", "resource_exhausted", "unavailable", "deadline_exceeded", "cancelled",
                    "error", "unauthenticated")
SAMPLE_OUTCOMES = ("served", "invalid", "refused", "unavailable", "deadline", "cancelled", "error")
SAMPLE_OUTCOME_OF = {"ok": "served", "invalid": "invalid", "resource_exhausted": "refused",
                     "unavailable": "unavailable", "deadline_exceeded": "deadline", "cancelled": "cancelled",
                     "error": "error"}
BATCH_SAMPLE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
        r = self.registry
        self.requests = Counter(P + "requests", "Feature requests (DoGet) by final status", ["status"], registry=r)
        self.samples = Counter(P + "samples", "Samples by outcome (served, or dropped with the reason)",
                               ["outcome"], registry=r)
        self.tokens = Counter(P + "tokens", "Tokens run through forward passes", registry=r)
        self.padded_tokens = Counter(P + "padded_tokens", "Padded tokens computed (B x longest T)", registry=r)
        self.batches = Counter(P + "batches", "Forward passes", registry=r)
        self.batch_tokens = Histogram(P + "batch_tokens", "Tokens per forward pass", buckets=TOKEN_BUCKETS, registry=r)
        self.batch_samples = Histogram(P + "batch_samples", "Samples per forward pass", buckets=BATCH_SAMPLE_BUCKETS,
                                       registry=r)
        self.forward_seconds = Histogram(P + "forward_seconds", "Forward pass wall time", buckets=TIME_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram(P + "queue_wait_seconds", "Time a sample waited before its forward pass",
                                            buckets=TIME_BUCKETS, registry=r)
        self.queue_tokens = Gauge(P + "queue_tokens", "Tokens waiting in the scheduler queue", registry=r)
        self.held_tokens = Gauge(P + "held_tokens", "Tokens computed and not yet sent (slow readers)", registry=r)
        self.queue_limit_tokens = Gauge(P + "queue_limit_tokens", "Bound on queued + held tokens (--max-queue-tokens)",
                                        registry=r)
        self.bytes_sent = Counter(P + "bytes_sent", "Feature bytes sent on the data plane", registry=r)
        self.active_streams = Gauge(P + "active_streams", "Feature streams being served", registry=r)
        self.auth_failures = Counter(P + "auth_failures", "Calls rejected for a missing or wrong token", ["plane"],
                                     registry=r)
        # Generation (the Generate RPC through the scheduler's decode batch).
        self.gen_requests = Counter(P + "generate_requests", "Generate calls by final status", ["status"], registry=r)
        self.gen_tokens = Counter(P + "generated_tokens", "Tokens generated", registry=r)
        self.gen_running = Gauge(P + "generate_running_sequences", "Sequences in the decode batch", registry=r)
        self.gen_queued = Gauge(P + "generate_queued_sequences", "Sequences waiting to join the decode batch",
                                registry=r)
        self.gen_kv_bytes = Gauge(P + "generate_kv_cache_bytes", "Bytes of KV cache the decode batch holds "
                                  "(every slot's columns up to those attended; 0 when the batch is empty)", registry=r)
        self.gen_batch_size = Histogram(P + "generate_batch_size", "Sequences per decode step",
                                        buckets=BATCH_SAMPLE_BUCKETS, registry=r)
        self.gen_step_seconds = Histogram(P + "generate_step_seconds", "Decode step wall time", buckets=TIME_BUCKETS,
                                          registry=r)
        self.gen_ttft_seconds = Histogram(P + "generate_ttft_seconds", "Time to first token (from arrival)",
                                          buckets=TIME_BUCKETS, registry=r)
        self.gen_tpot_seconds = Histogram(P + "generate_tpot_seconds", "Time per output token after the first",
                                          buckets=TIME_BUCKETS, registry=r)
        self.ready = Gauge(P + "ready", "1 when serving, 0 when starting or draining", registry=r)
        self.model = Info(P + "model", "The served model contract", registry=r)
        # Export every label value from the start, so dashboards and rate() see zeros, not gaps.
        for s in REQUEST_STATUSES:
            self.requests.labels(status=s)
        for o in SAMPLE_OUTCOMES:
            self.samples.labels(outcome=o)
        for st in REQUEST_STATUSES:
            self.gen_requests.labels(status=st)
        for plane in ("grpc", "flight"):
            self.auth_failures.labels(plane=plane)

    def set_model(self, info: ModelInfo) -> None:
        self.model.info({
            "model_name": info.model_name, "architecture": info.architecture, "model_type": info.model_type,
            "backend": info.backend, "hidden_size": str(info.hidden_size), "num_layers": str(info.num_layers),
            "vocab_size": str(info.vocab_size), "aux_layer_ids": ",".join(map(str, info.aux_layer_ids)),
            "dtype": info.dtype, "teacher_modes": ",".join(info.teacher_modes),
            "max_length": str(info.max_length), "server_version": info.server_version,
            "tokenizer_fingerprint": info.tokenizer_fingerprint[:16],
        })

    def observe_batch(self, num_samples: int, tokens: int, padded_tokens: int, seconds: float) -> None:
        self.batches.inc()
        self.tokens.inc(tokens)
        self.padded_tokens.inc(padded_tokens)
        self.batch_tokens.observe(tokens)
        self.batch_samples.observe(num_samples)
        self.forward_seconds.observe(seconds)

    def finish_request(self, status: str, served: int, total: int) -> None:
        """Count a request's final status and the fate of each of its `total` samples."""
        self.requests.labels(status=status).inc()
        if served:
            self.samples.labels(outcome="served").inc(served)
        if total > served:
            self.samples.labels(outcome=SAMPLE_OUTCOME_OF.get(status, "error")).inc(total - served)
