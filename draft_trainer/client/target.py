"""A client for one target server: control plane (gRPC) and data plane (Arrow Flight).

The pool (draft_trainer/client/pool.py) builds on this: balancing, failover, discovery.
Errors: control-plane calls raise TargetUnavailableError whose message starts with the gRPC
status name; `features()` lets the Flight error through. Classify either with
`common.status.classify` (RESOURCE_EXHAUSTED carries a retry hint).

Security: `auth_token` is sent as `authorization: Bearer <token>` on both planes;
`tls_root_cert` (a PEM file) switches both planes to TLS, verified against that root.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator

import grpc
import pyarrow.flight as flight
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load as safetensors_load

from common.contract import TEACHER_HIDDEN, ModelInfo, teacher_mode_to_pb
from common.errors import ContractError, SpecRelayError, TargetUnavailableError
from common.features import FEATURE_SCHEMA_VERSION, SampleAssembler, SampleFeatures, decode_batch
from common.rpc import target_pb2 as pb
from common.rpc import target_pb2_grpc as pb_grpc
from common.security import AUTH_HEADER, bearer_value, read_pem

GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SpecRelayError(f"endpoint {endpoint!r} must look like host:port (the server's gRPC port)")
    return host.strip("[]"), int(port)


def join_host_port(host: str, port: int) -> str:
    """The inverse of parse_endpoint: IPv6 literals need brackets in gRPC and Flight targets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def speaks_tls(endpoint: str, timeout_s: float = 1.0) -> bool:
    """Whether a TLS handshake succeeds on `endpoint` (no verification: only to explain a failure)."""
    import socket
    import ssl

    host, port = parse_endpoint(endpoint)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with ctx.wrap_socket(raw, server_hostname=host if not host.replace(".", "").isdigit() and ":" not in host
                                 else None):
                return True
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        return False


class TargetClient:
    def __init__(self, endpoint: str, *, client_id: str | None = None, timeout_s: float = 30.0,
                 auth_token: str | None = None, tls_root_cert: str | None = None,
                 tls_server_name: str | None = None) -> None:
        self.endpoint = endpoint
        self.host, self.port = parse_endpoint(endpoint)
        self.client_id = client_id or uuid.uuid4().hex[:12]
        self.timeout_s = timeout_s
        self._metadata = ((AUTH_HEADER, bearer_value(auth_token)),) if auth_token else None
        self._flight_headers = [(AUTH_HEADER.encode(), bearer_value(auth_token).encode())] if auth_token else []
        self._tls_root = read_pem(tls_root_cert, "tls_root_cert") if tls_root_cert else None
        self._tls_server_name = tls_server_name
        target = join_host_port(self.host, self.port)
        if self._tls_root is not None:
            options = GRPC_OPTIONS + ([("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else [])
            creds = grpc.ssl_channel_credentials(root_certificates=self._tls_root)
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=GRPC_OPTIONS)
        self._stub = pb_grpc.TargetServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._flight: flight.FlightClient | None = None
        self._info: ModelInfo | None = None

    # ------------------------------------------------------------------ control plane
    def _rpc_error(self, what: str, e: grpc.RpcError) -> SpecRelayError:
        return TargetUnavailableError(f"{what} on {self.endpoint} failed: {e.code().name}: {e.details()}")

    def model_info(self, refresh: bool = False) -> ModelInfo:
        if self._info is None or refresh:
            try:
                self._info = ModelInfo.from_proto(self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout_s,
                                                                         metadata=self._metadata))
            except grpc.RpcError as e:
                raise self._rpc_error("GetModelInfo", e) from None
        return self._info

    def healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            r = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s,
                                   metadata=self._metadata)
            return r.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def wait_ready(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.healthy():
                return
            time.sleep(0.2)
        raise TargetUnavailableError(f"target server {self.endpoint} not ready after {timeout_s:.0f}s")

    def fetch_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Frozen target tensors (embed_tokens, lm_head, final_norm, layers.<i>.<suffix>), digest-checked."""
        parts, digest, total = [], "", 0
        try:
            for chunk in self._stub.FetchTensors(pb.FetchTensorsRequest(names=names), timeout=max(self.timeout_s, 300),
                                                 metadata=self._metadata):
                parts.append(chunk.data)
                digest, total = chunk.sha256, chunk.total_bytes
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                # A name this server cannot serve: asking another server of the same model will not help.
                raise ContractError(f"FetchTensors on {self.endpoint}: {e.details()}") from None
            raise self._rpc_error("FetchTensors", e) from None
        blob = b"".join(parts)
        if len(blob) != total or hashlib.sha256(blob).hexdigest() != digest:
            raise ContractError(f"FetchTensors from {self.endpoint}: corrupt transfer ({len(blob)} of {total} bytes, "
                                "digest mismatch); retry")
        return safetensors_load(blob)

    def generate(self, prompts: list[tuple[str, list[int]]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop_token_ids: list[int] | None = None,
                 stop: list[str] | None = None, timeout_s: float | None = None) -> list[tuple[str, list[int], str]]:
        """Completions (id, token ids, finish reason) of token-id prompts."""
        return self._generate([pb.GenerateRequest.Prompt(id=i, token_ids=t) for i, t in prompts], max_new_tokens,
                              temperature, top_p, top_k, seed, stop_token_ids, stop, None, timeout_s)

    def generate_messages(self, prompts: list[tuple[str, list[dict]]], *, max_new_tokens: int,
                          chat_template_kwargs: dict | None = None, temperature: float = 0.0, top_p: float = 1.0,
                          top_k: int = 0, seed: int = 0, stop_token_ids: list[int] | None = None,
                          stop: list[str] | None = None,
                          timeout_s: float | None = None) -> list[tuple[str, list[int], str]]:
        """Completions of chat prompts rendered by the server's chat template (+ template variables)."""
        return self._generate([pb.GenerateRequest.Prompt(id=i, messages_json=json.dumps(m)) for i, m in prompts],
                              max_new_tokens, temperature, top_p, top_k, seed, stop_token_ids, stop,
                              chat_template_kwargs, timeout_s)

    def _generate(self, prompts, max_new_tokens, temperature, top_p, top_k, seed, stop_token_ids, stop,
                  chat_template_kwargs, timeout_s) -> list[tuple[str, list[int], str]]:
        req = pb.GenerateRequest(
            prompts=prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, stop_token_ids=stop_token_ids or [], stop=stop or [], client_id=self.client_id,
            chat_template_kwargs_json=json.dumps(chat_template_kwargs) if chat_template_kwargs else "",
        )
        try:
            resp = self._stub.Generate(req, timeout=timeout_s or max(self.timeout_s, 600), metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._rpc_error("Generate", e) from None
        return [(c.id, list(c.token_ids), c.finish_reason) for c in resp.completions]

    # ------------------------------------------------------------------ data plane
    def _flight_client(self) -> flight.FlightClient:
        if self._flight is None:
            port = self.model_info().flight_port
            if self._tls_root is not None:
                self._flight = flight.FlightClient(f"grpc+tls://{join_host_port(self.host, port)}", tls_root_certs=self._tls_root,
                                                   override_hostname=self._tls_server_name)
            else:
                self._flight = flight.FlightClient(f"grpc://{join_host_port(self.host, port)}")
        return self._flight

    def features(self, sample_ids: list[int], seqs: list[list[int]], *, teacher: str = TEACHER_HIDDEN,
                 topk: int = 0, layer_ids=(), deadline_s: float | None = None,
                 expect_dtype: str = "", tensor_dtypes=()) -> Iterator[SampleFeatures]:
        """Stream features for the given samples; yields each sample once it is complete.

        Tensors asked as fp8 (`tensor_dtypes`) come as `Fp8Rows`: the e4m3 bytes and scales as they
        arrived (views of the Arrow buffers); the trainer upcasts them into its batch
        (`SampleFeatures.upcast()` gives tensors in the served dtype)."""
        req = pb.FeatureRequest(
            request_id=uuid.uuid4().hex, sample_ids=sample_ids,
            token_ids=[t for s in seqs for t in s], lengths=[len(s) for s in seqs],
            teacher_mode=teacher_mode_to_pb(teacher), topk=topk, feature_schema_version=FEATURE_SCHEMA_VERSION,
            client_id=self.client_id, deadline_unix_s=(time.time() + deadline_s) if deadline_s else 0.0,
            expect_dtype=expect_dtype, layer_ids=list(layer_ids), tensor_dtypes=dict(tensor_dtypes),
        )
        options = flight.FlightCallOptions(timeout=deadline_s or None, headers=self._flight_headers)
        reader = self._flight_client().do_get(flight.Ticket(req.SerializeToString()), options=options)
        assembler = SampleAssembler()
        for chunk in reader:
            for row in decode_batch(chunk.data, keep_fp8=True):
                done = assembler.add(row)
                if done is not None:
                    yield done
        if assembler.pending:
            raise ContractError(f"stream from {self.endpoint} ended with incomplete samples {assembler.pending}")

    def close(self) -> None:
        if self._flight is not None:
            self._flight.close()
            self._flight = None
        self._channel.close()
