"""Wires a backend, the scheduler, the gRPC control plane, the Flight data plane and metrics.

    server = TargetServer(ServerConfig(model="path", backend="hf"))
    server.start()          # binds ports (0 = any free port)
    server.wait()           # until shutdown()
    server.shutdown(drain=True)

Drain (SIGTERM): health goes NOT_SERVING at once and new feature requests are refused with
UNAVAILABLE; queued and in-flight work is computed and its streams finish, all within
`drain_timeout_s`; then both ports close. `shutdown` returns whether the drain was complete.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.contract import ModelInfo
from common.errors import ConfigError
from common.metrics import serve_metrics
from common.rpc import target_pb2_grpc as pb_grpc
from common.security import read_pem, read_token_file
from target_server.auth import BearerTokenInterceptor
from target_server.backends.base import Backend
from target_server.backends.registry import check_sections, load_backend
from target_server.flight import FeatureFlightServer
from target_server.metrics import ServerMetrics
from target_server.ports import GRPC_BIND_OPTIONS, bind_grpc, start_flight
from target_server.scheduler import Scheduler
from target_server.service import TargetService

log = logging.getLogger(__name__)

SERVICE_NAME = "specrelay.v1.TargetService"
GRPC_OPTIONS = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]
CLOSE_TIMEOUT_S = 5.0  # after the drain, how long closing the ports may take


@dataclass
class ServerConfig:
    model: str = ""
    backend: str = "hf"  # a name in target_server.backends.registry.BACKENDS
    device: str = "cpu"
    dtype: str = "fp32"
    tp: int = 1  # tensor-parallel ranks (the sglang backend's section)
    aux_layers: str = "auto"
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    flight_port: int = 50052
    metrics_port: int = -1  # -1 = disabled, 0 = any free port
    max_batch_tokens: int = 8192
    max_queue_tokens: int = 65536
    max_request_tokens: int = 65536
    max_length: int = 0  # 0 = the model's max_position_embeddings
    max_topk: int = 64  # largest k a client may ask for in teacher=topk mode
    batch_invariant: bool = False  # features independent of batch-mates (hf, sglang: one sample per forward)
    drain_timeout_s: float = 30.0
    auth_token_file: str = ""  # bearer token required on both planes when set
    tls_cert: str = ""  # PEM certificate chain; with tls_key, both planes speak TLS
    tls_key: str = ""
    ready_file: str = ""  # written (JSON: ports, pid) once serving; for supervisors and tests
    parent_pid: int = 0   # exit when this process is gone: a supervisor killed with -9 leaves no server behind
    # the synthetic backend's section
    synthetic_hidden_size: int = 64
    synthetic_num_layers: int = 8
    synthetic_vocab_size: int = 512
    synthetic_cost_per_token_us: float = 0.0

    def validate(self) -> None:
        if self.tp < 1:
            raise ConfigError(f"--tp: {self.tp} must be >= 1")
        check_sections(self)  # the backend exists, has its --model, and no other backend's option is set
        if self.max_batch_tokens <= 0 or self.max_queue_tokens <= 0 or self.max_request_tokens <= 0:
            raise ConfigError("--max-batch-tokens, --max-queue-tokens and --max-request-tokens must be > 0")
        if self.max_topk <= 0:
            raise ConfigError("--max-topk must be > 0")
        if self.drain_timeout_s < 0:
            raise ConfigError("--drain-timeout must be >= 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together: give both (PEM files) or neither")
        if not self.host:
            raise ConfigError("--host: give an address to bind (127.0.0.1 for this machine only)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TargetServer:
    def __init__(self, cfg: ServerConfig, backend: Backend | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        # Security material first: a bad token or certificate path fails before the model loads.
        self.auth_token = read_token_file(cfg.auth_token_file) if cfg.auth_token_file else None
        self.tls = (read_pem(cfg.tls_cert, "--tls-cert"), read_pem(cfg.tls_key, "--tls-key")) if cfg.tls_cert else None
        self.backend = backend or load_backend(cfg)
        self.metrics = ServerMetrics()
        self.scheduler = Scheduler(self.backend, max_batch_tokens=cfg.max_batch_tokens,
                                   max_queue_tokens=cfg.max_queue_tokens, metrics=self.metrics)
        self.info: ModelInfo = self.backend.model_info()
        self.info.max_batch_tokens = cfg.max_batch_tokens
        self.info.max_request_tokens = min(cfg.max_request_tokens, cfg.max_queue_tokens)
        self._grpc: grpc.Server | None = None
        self._flight: FeatureFlightServer | None = None
        self._health = health.HealthServicer()
        self._draining = threading.Event()
        self._stopped = threading.Event()
        self._shutdown_lock = threading.Lock()
        self.drained_cleanly: bool | None = None
        self.grpc_port = self.flight_port = self.metrics_port = None

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def start(self) -> "TargetServer":
        cfg = self.cfg
        if not is_loopback(cfg.host) and (self.auth_token is None or self.tls is None):
            log.warning("binding %s (not loopback) without %s: anyone who can reach this host can use the server",
                        cfg.host, " and ".join(x for x, on in (("--auth-token-file", self.auth_token),
                                                                ("--tls-cert/--tls-key", self.tls)) if not on))
        scheme = "grpc+tls" if self.tls else "grpc"
        self._flight = start_flight(lambda: FeatureFlightServer(
            f"{scheme}://{cfg.host}:{cfg.flight_port}", self.scheduler, self.info, metrics=self.metrics,
            max_request_tokens=self.info.max_request_tokens, auth_token=self.auth_token,
            tls_certificates=[self.tls] if self.tls else None,
        ), cfg.host, cfg.flight_port)
        self.flight_port = self._flight.port
        self.info.flight_port = self.flight_port
        interceptors = []
        if self.auth_token:
            interceptors.append(BearerTokenInterceptor(
                self.auth_token, on_reject=lambda: self.metrics.auth_failures.labels(plane="grpc").inc()))
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="grpc"),
                                 interceptors=interceptors, options=GRPC_OPTIONS + GRPC_BIND_OPTIONS)
        pb_grpc.add_TargetServiceServicer_to_server(
            TargetService(self.backend, self.info, self.scheduler, draining=lambda: self.draining,
                          metrics=self.metrics), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        creds = grpc.ssl_server_credentials([(self.tls[1], self.tls[0])]) if self.tls else None
        try:
            self.grpc_port = bind_grpc(self._grpc, cfg.host, cfg.grpc_port, creds)
        except ConfigError:
            self._flight.shutdown()
            raise
        self._grpc.start()
        self.metrics.queue_limit_tokens.set(cfg.max_queue_tokens)
        if cfg.metrics_port >= 0:
            self.metrics_port = serve_metrics(self.metrics.registry, cfg.host, cfg.metrics_port)
        self.metrics.set_model(self.info)
        self.scheduler.start()
        self._set_serving(True)
        log.info("serving %s (%s backend, %s): grpc %s:%d, flight %s://%s:%d%s%s", self.info.model_name,
                 self.backend.name, self.info.dtype, cfg.host, self.grpc_port, scheme, cfg.host, self.flight_port,
                 f", metrics :{self.metrics_port}" if self.metrics_port else "",
                 ", bearer-token auth" if self.auth_token else "")
        if cfg.ready_file:
            tmp = Path(cfg.ready_file + ".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), "host": cfg.host, "grpc_port": self.grpc_port,
                                       "flight_port": self.flight_port, "metrics_port": self.metrics_port,
                                       "tls": bool(self.tls), "auth": bool(self.auth_token)}))
            os.replace(tmp, cfg.ready_file)
        return self

    def _set_serving(self, serving: bool) -> None:
        state = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self._health.set("", state)
        self._health.set(SERVICE_NAME, state)
        self.metrics.ready.set(1 if serving else 0)

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def shutdown(self, drain: bool = True) -> bool:
        """Drain (if asked) and close; True if every accepted request finished. Idempotent."""
        with self._shutdown_lock:
            if self._stopped.is_set():
                return bool(self.drained_cleanly)
            self._draining.set()
            self._set_serving(False)
            end = time.monotonic() + (self.cfg.drain_timeout_s if drain else 0.0)
            finished = self.scheduler.drain(max(0.0, end - time.monotonic()))
            # Computed work still has to reach its clients: wait for the open streams to end.
            while self._flight is not None and self._flight.open_streams and time.monotonic() < end:
                time.sleep(0.05)
            open_streams = self._flight.open_streams if self._flight is not None else 0
            self.drained_cleanly = finished and open_streams == 0
            if drain:
                log.info("drain %s", "complete" if self.drained_cleanly else
                         f"cut short after {self.cfg.drain_timeout_s:.0f}s ({self.scheduler.queued_tokens} tokens "
                         f"queued, {open_streams} streams open)")
            self.scheduler.stop()  # fails what is left with UNAVAILABLE, so streams end at once
            self._close_ports()
            self.backend.close()
            self._stopped.set()
            return self.drained_cleanly

    def _close_ports(self) -> None:
        # Flight's shutdown waits for every open call; a client that stopped reading could hold it
        # forever, so it runs in a helper thread with a bound (the process exits regardless).
        closers = []
        if self._flight is not None:
            closers.append(threading.Thread(target=self._flight.shutdown, name="flight-shutdown", daemon=True))
        if self._grpc is not None:
            grpc_server = self._grpc
            closers.append(threading.Thread(target=lambda: grpc_server.stop(grace=1.0).wait(CLOSE_TIMEOUT_S),
                                            name="grpc-shutdown", daemon=True))
        for t in closers:
            t.start()
        end = time.monotonic() + CLOSE_TIMEOUT_S
        for t in closers:
            t.join(max(0.0, end - time.monotonic()))
            if t.is_alive():
                log.warning("%s did not finish within %.0fs; exiting anyway", t.name, CLOSE_TIMEOUT_S)
