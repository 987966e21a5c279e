"""A second target server on a busy port exits with "port N is in use" instead of sharing the
port (gRPC's SO_REUSEPORT) or printing a pyarrow traceback (Flight). Real servers on 127.0.0.1."""

from __future__ import annotations

import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.procs import run_cli, start_server

SYNTHETIC = ("--backend", "synthetic", "--synthetic-hidden-size", "16")


def second_server(grpc_port: int, flight_port: int):
    return run_cli("target_server", "serve", "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
                   "--flight-port", str(flight_port), *SYNTHETIC, timeout=120)


def test_second_server_on_a_busy_port_exits_with_a_clear_message(tmp_path):
    first = start_server(tmp_path, *SYNTHETIC)
    try:
        res = second_server(first.grpc_port, 0)
        assert res.returncode == 2, res.stderr[-3000:]
        assert f"port {first.grpc_port} is in use (gRPC on 127.0.0.1)" in res.stderr and "--grpc-port" in res.stderr
        assert "Traceback" not in res.stderr

        res = second_server(0, first.flight_port)
        assert res.returncode == 2, res.stderr[-3000:]
        assert f"port {first.flight_port} is in use (Flight on 127.0.0.1)" in res.stderr and "--flight-port" in res.stderr
        assert "Traceback" not in res.stderr and "ArrowException" not in res.stderr

        # The first server is untouched and still the only one answering on its port.
        with grpc.insecure_channel(first.endpoint) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert first.proc.poll() is None
    finally:
        assert first.stop(signal.SIGTERM) == 0, first.log()[-3000:]
