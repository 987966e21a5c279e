"""Target servers as Ray actors: each actor runs a TargetServer in-process on its node.

The server code is the same as `target-server serve` (its own argument parser builds the
config), so every flag works here too. Ray is imported lazily: the launcher validates the
server flags with `server_config` before Ray starts. Ports default to 0 (any free port) because several
servers may share a node; each actor reports the endpoint it actually bound.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass

log = logging.getLogger(__name__)


def server_config(server_args: str, bind_host: str):
    """A ServerConfig from `target-server serve` arguments (free ports unless given)."""
    from target_server.cli import build_parser
    from target_server.server import ServerConfig

    argv = shlex.split(server_args)
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    defaults = {"--grpc-port": "0", "--flight-port": "0", "--metrics-port": "0", "--host": bind_host}
    for flag, value in defaults.items():
        if flag not in given:
            argv += [flag, value]
    args = build_parser().parse_args(["serve", *argv])
    return ServerConfig(**{k: v for k, v in vars(args).items() if k in ServerConfig.__dataclass_fields__})


@dataclass
class ServerEndpoint:
    host: str
    grpc_port: int
    flight_port: int
    metrics_port: int | None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.grpc_port}"


class TargetServerActor:
    """One target server (wrapped with ray.remote by `start_servers`, with its GPU resources)."""

    def __init__(self, server_args: str, bind_host: str) -> None:
        logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        import ray

        from target_server.server import TargetServer

        cfg = server_config(server_args, bind_host)
        self.server = TargetServer(cfg).start()
        # A wildcard bind is reached through the node's address.
        self.host = ray.util.get_node_ip_address() if cfg.host in ("0.0.0.0", "::", "") else cfg.host

    def endpoint(self) -> ServerEndpoint:
        s = self.server
        return ServerEndpoint(self.host, s.grpc_port, s.flight_port, s.metrics_port)

    def shutdown(self, drain: bool = True) -> None:
        self.server.shutdown(drain=drain)


def start_servers(n: int, server_args: str, *, gpus: float, cpus: float, bind_host: str,
                  timeout_s: float = 1800.0) -> tuple[list, list[ServerEndpoint]]:
    """Start `n` server actors (each with `gpus` GPUs) and wait until every one is serving."""
    import ray

    cls = ray.remote(num_gpus=gpus, num_cpus=cpus, max_restarts=0)(TargetServerActor)
    actors = [cls.options(name=None).remote(server_args, bind_host) for _ in range(n)]
    endpoints = ray.get([a.endpoint.remote() for a in actors], timeout=timeout_s)
    for e in endpoints:
        log.info("target server up at %s (flight %d, metrics %s)", e.endpoint, e.flight_port, e.metrics_port)
    return actors, endpoints


def stop_servers(actors: list, timeout_s: float = 120.0) -> None:
    """Drain every server (finish in-flight work), then release the actors."""
    import ray

    try:
        ray.get([a.shutdown.remote(drain=True) for a in actors], timeout=timeout_s)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
