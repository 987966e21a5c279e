"""Prometheus metrics of the trainer (prefix specrelay_trainer_).

One registry object per trainer process (rank), with the process metrics (common/metrics.py);
the pool records its data-path metrics here, the loop its data wait and step metrics. Exposed with common.metrics.serve_metrics (config `metrics_port`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.metrics import TIME_BUCKETS, RegisteredOnFirstSet, new_registry

P = "specrelay_trainer_"

ENDPOINT_STATES = ("joining", "up", "down", "refused", "draining")


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
        r = self.registry
        # Data path (draft_trainer/client).
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
        self.samples_consumed = Counter(P + "samples_consumed", "Samples handed to the training step", registry=r)
        self.samples_dropped = Counter(P + "samples_dropped", "Samples dropped, by reason", ["reason"], registry=r)
        self.data_wait_seconds = Counter(P + "data_wait_seconds", "Time the trainer waited for features", registry=r)
        # Training (draft_trainer/train/loop.py).
        self.steps = Counter(P + "steps", "Optimizer steps taken", registry=r)
        self.tokens = Counter(P + "tokens", "Tokens trained on (demand on the target pool)", registry=r)
        self.step_seconds = Histogram(P + "step_seconds", "Optimizer step wall time, data wait included",
                                      buckets=TIME_BUCKETS, registry=r)
        self.loss = Gauge(P + "loss", "Training loss of the last step (weighted TTT sum)", registry=r)
        self.accuracy = Gauge(P + "accuracy", "Draft accuracy of the last step per TTT position", ["position"],
                              registry=r)
        self.cond_accuracy = Gauge(P + "cond_accuracy", "Accuracy per TTT position given all earlier positions "
                                   "were right", ["position"], registry=r)
        self.sim_accept_len = Gauge(P + "sim_accept_len", "Simulated acceptance length of the last step", registry=r)
        # Absent until the first evaluation (a run with eval.holdout=0 never reports one).
        self.eval_sim_accept_len = RegisteredOnFirstSet(
            Gauge(P + "eval_sim_accept_len", "Held-out simulated acceptance length", registry=None), r)
        self.lr = Gauge(P + "lr", "Learning rate", registry=r)
        self.checkpoints = Counter(P + "checkpoints", "Checkpoints written", registry=r)

    def set_endpoint_states(self, counts: dict[str, int]) -> None:
        for state in ENDPOINT_STATES:
            self.endpoints.labels(state=state).set(counts.get(state, 0))
