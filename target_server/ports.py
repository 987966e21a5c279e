"""Binding the server's gRPC and Flight ports: a busy port is refused with "port N is in use".

gRPC sets SO_REUSEPORT on its listening sockets by default, so a second server on a port already
in use starts without error and the kernel spreads new connections over both: trainers would
talk to two different servers through one address. `GRPC_BIND_OPTIONS` turns that off. Arrow
Flight refuses a busy port, but with "Server did not start properly" and a traceback; the port
is probed to say why.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import TypeVar

import grpc

from common.errors import ConfigError

T = TypeVar("T")

GRPC_BIND_OPTIONS = [("grpc.so_reuseport", 0)]  # a busy port fails to bind instead of being shared


def port_in_use(host: str, port: int) -> bool:
    """Whether binding host:port now fails with "address in use" (the probe socket is closed at once)."""
    if not port:
        return False
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False
    for family, kind, proto, _, addr in infos[:1]:
        with socket.socket(family, kind, proto) as s:
            try:
                s.bind(addr)
            except OSError as e:
                return e.errno == errno.EADDRINUSE
    return False


def _in_use(plane: str, host: str, port: int, flag: str) -> ConfigError:
    return ConfigError(f"port {port} is in use ({plane} on {host}): another target server or program is "
                       f"listening there; stop it or choose another {flag}")


def bind_grpc(server: grpc.Server, host: str, port: int,
              credentials: grpc.ServerCredentials | None = None) -> int:
    """Add the listening port to a server built with GRPC_BIND_OPTIONS; returns the bound port."""
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as e:
        if port_in_use(host, port):
            raise _in_use("gRPC", host, port, "--grpc-port") from None
        raise ConfigError(f"could not bind gRPC on {address}: {e}") from None
    if not bound:
        raise _in_use("gRPC", host, port, "--grpc-port") if port_in_use(host, port) else \
            ConfigError(f"could not bind gRPC on {address}")
    if port and bound != port:
        raise ConfigError(f"gRPC bound port {bound}, not the requested {port}")
    return bound


def start_flight(make: Callable[[], T], host: str, port: int) -> T:
    """Build the Flight server (which binds in its constructor), saying "port N is in use" when it is."""
    import pyarrow as pa

    try:
        return make()
    except pa.ArrowException as e:
        if port_in_use(host, port):
            raise _in_use("Flight", host, port, "--flight-port") from None
        raise ConfigError(f"could not start the Flight server on {host}:{port}: {e}") from None
