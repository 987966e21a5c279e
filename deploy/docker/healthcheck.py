#!/usr/bin/env python3
"""Container health check for SpecRelay images (Docker HEALTHCHECK, Kubernetes exec probes, compose).

    specrelay-healthcheck grpc --port 50051            # target server: grpc.health.v1 says SERVING
    specrelay-healthcheck http --url http://127.0.0.1:9400/metrics   # trainer: metrics endpoint answers

Exit status 0 = healthy, 1 = unhealthy (the reason is printed). A draining server reports
NOT_SERVING, so it turns unhealthy at once and stops receiving traffic. Kubernetes' native
`grpc:` probes do the same check without this script but cannot use TLS; with --tls-cert set on
the server, use an exec probe running `specrelay-healthcheck grpc --tls-ca FILE`.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request


def check_grpc(args: argparse.Namespace) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"{args.host}:{args.port}"
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target)
    metadata = []
    if args.token_file:
        with open(args.token_file) as f:
            metadata.append(("authorization", f"Bearer {f.read().strip()}"))
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout,
                          metadata=metadata or None)
    except grpc.RpcError as e:
        return False, f"gRPC health check on {target} failed: {e.code().name}: {e.details()}"
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, f"{target} service {args.service!r}: {status}"


def check_http(args: argparse.Namespace) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as resp:  # noqa: S310 (local URL)
            return 200 <= resp.status < 300, f"{args.url}: HTTP {resp.status}"
    except OSError as e:
        return False, f"{args.url}: {e}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specrelay-healthcheck", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="kind", required=True)
    g = sub.add_parser("grpc", help="grpc.health.v1 Check against a target server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=50051)
    g.add_argument("--service", default="", help="service name ('' = the whole server)")
    g.add_argument("--tls-ca", default="", help="CA bundle when the server runs with --tls-cert")
    g.add_argument("--tls-server-name", default="", help="expected name in the server certificate")
    g.add_argument("--token-file", default="", help="bearer token file, if health checks require auth")
    g.add_argument("--timeout", type=float, default=3.0)
    h = sub.add_parser("http", help="HTTP GET (e.g. a trainer's /metrics)")
    h.add_argument("--url", default="http://127.0.0.1:9400/metrics")
    h.add_argument("--timeout", type=float, default=3.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ok, message = check_grpc(args) if args.kind == "grpc" else check_http(args)
    print(("healthy: " if ok else "unhealthy: ") + message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
