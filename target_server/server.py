"""Wires a backend, the scheduler, the gRPC control plane, the Flight data plane and metrics.

    server = TargetServer(ServerConfig(model="path", backend="hf"))
    server.start()          # binds ports (0 = any free port), loads nothing else
    server.wait()           # until shutdown()
    server.shutdown(drain=True)

Drain (SIGTERM): health goes NOT_SERVING at once, new feature requests are refused, queued
and in-flight work finishes within `drain_timeout_s`, then the process exits.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.contract import ModelInfo
from common.errors import ConfigError
from common.metrics import serve_metrics
from common.rpc import target_pb2_grpc as pb_grpc
from target_server.backends.base import Backend
from target_server.flight import FeatureFlightServer
from target_server.metrics import ServerMetrics
from target_server.scheduler import Scheduler
from target_server.service import TargetService

log = logging.getLogger(__name__)

SERVICE_NAME = "specrelay.v1.TargetService"


@dataclass
class ServerConfig:
    model: str = ""
    backend: str = "hf"  # hf | synthetic | sglang
    device: str = "cpu"
    dtype: str = "fp32"
    tp: int = 1  # tensor-parallel ranks (sglang backend only)
    aux_layers: str = "auto"
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    flight_port: int = 50052
    metrics_port: int = -1  # -1 = disabled, 0 = any free port
    max_batch_tokens: int = 8192
    max_queue_tokens: int = 65536
    max_request_tokens: int = 65536
    max_length: int = 0  # 0 = the model's max_position_embeddings
    drain_timeout_s: float = 30.0
    ready_file: str = ""  # written (JSON: ports, pid) once serving; for supervisors and tests
    # synthetic backend only
    synthetic_hidden_size: int = 64
    synthetic_num_layers: int = 8
    synthetic_vocab_size: int = 512
    synthetic_cost_per_token_us: float = 0.0

    def validate(self) -> None:
        if self.backend not in ("hf", "synthetic", "sglang"):
            raise ConfigError(f"backend: {self.backend!r} is not one of hf, synthetic, sglang")
        if self.backend != "synthetic" and not self.model:
            raise ConfigError("model: required for the hf and sglang backends (a local HF model directory)")
        if self.tp < 1:
            raise ConfigError(f"tp: {self.tp} must be >= 1")
        if self.tp > 1 and self.backend != "sglang":
            raise ConfigError(f"tp: {self.tp} needs --backend sglang (the {self.backend} backend runs on one device)")
        if self.max_batch_tokens <= 0 or self.max_queue_tokens <= 0:
            raise ConfigError("max_batch_tokens and max_queue_tokens must be > 0")


def load_backend(cfg: ServerConfig) -> Backend:
    # Imported lazily: the sglang backend pulls in SGLang, which the core never imports at start-up.
    if cfg.backend == "hf":
        from target_server.backends.hf import HFBackend

        return HFBackend(cfg.model, device=cfg.device, dtype=cfg.dtype, aux_layers=cfg.aux_layers,
                         max_length=cfg.max_length or None)
    if cfg.backend == "synthetic":
        from target_server.backends.synthetic import SyntheticBackend

        return SyntheticBackend.from_config(cfg)
    if cfg.backend == "sglang":
        from target_server.backends.sglang import SGLangBackend

        return SGLangBackend.from_config(cfg)
    raise ConfigError(f"unknown backend {cfg.backend!r}")


class TargetServer:
    def __init__(self, cfg: ServerConfig, backend: Backend | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
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
        self._stopped = threading.Event()
        self.grpc_port = self.flight_port = self.metrics_port = None

    def start(self) -> "TargetServer":
        cfg = self.cfg
        self._flight = FeatureFlightServer(
            f"grpc://{cfg.host}:{cfg.flight_port}", self.scheduler, self.info, metrics=self.metrics,
            max_request_tokens=self.info.max_request_tokens,
        )
        self.flight_port = self._flight.port
        self.info.flight_port = self.flight_port
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="grpc"))
        pb_grpc.add_TargetServiceServicer_to_server(TargetService(self.backend, self.info), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"{cfg.host}:{cfg.grpc_port}")
        if self.grpc_port == 0:
            raise ConfigError(f"could not bind gRPC on {cfg.host}:{cfg.grpc_port}")
        self._grpc.start()
        if cfg.metrics_port >= 0:
            self.metrics_port = serve_metrics(self.metrics.registry, cfg.host, cfg.metrics_port)
        self.metrics.set_model(self.info)
        self.scheduler.start()
        self._set_serving(True)
        log.info("serving %s (%s backend): grpc %s:%d, flight %s:%d", self.info.model_name, self.backend.name,
                 cfg.host, self.grpc_port, cfg.host, self.flight_port)
        if cfg.ready_file:
            tmp = Path(cfg.ready_file + ".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), "host": cfg.host, "grpc_port": self.grpc_port,
                                       "flight_port": self.flight_port, "metrics_port": self.metrics_port}))
            os.replace(tmp, cfg.ready_file)
        return self

    def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self._health.set("", status)
        self._health.set(SERVICE_NAME, status)
        self.metrics.ready.set(1 if serving else 0)

    def wait(self) -> None:
        self._stopped.wait()

    def shutdown(self, drain: bool = True) -> None:
        if self._stopped.is_set():
            return
        self._set_serving(False)
        if drain:
            finished = self.scheduler.drain(self.cfg.drain_timeout_s)
            log.info("drain %s", "complete" if finished else f"timed out after {self.cfg.drain_timeout_s}s")
        self.scheduler.stop()
        if self._flight is not None:
            # Give in-flight streams a moment to hand over their last batches.
            self._flight.shutdown()
        if self._grpc is not None:
            self._grpc.stop(grace=2.0).wait(5.0)
        self.backend.close()
        self._stopped.set()
