"""`target-server serve ...`: run a target server until SIGTERM/SIGINT (then drain and exit)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from common.errors import SpecRelayError
from target_server.server import ServerConfig, TargetServer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="target-server", description="SpecRelay target server")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve EAGLE-3 features for a target model")
    d = ServerConfig()
    s.add_argument("--model", default=d.model, help="local HF model directory")
    s.add_argument("--backend", default=d.backend, choices=["hf", "synthetic", "sglang"])
    s.add_argument("--device", default=d.device)
    s.add_argument("--dtype", default=d.dtype, choices=["bf16", "fp16", "fp32"])
    s.add_argument("--tp", type=int, default=d.tp, help="tensor-parallel ranks (sglang backend; one GPU each)")
    s.add_argument("--aux-layers", default=d.aux_layers, help="'auto' = [1, L//2-1, L-4], or i,j,k")
    s.add_argument("--host", default=d.host, help="bind address (default loopback; 0.0.0.0 must be explicit)")
    s.add_argument("--grpc-port", type=int, default=d.grpc_port, help="control plane port (0 = any free)")
    s.add_argument("--flight-port", type=int, default=d.flight_port, help="data plane port (0 = any free)")
    s.add_argument("--metrics-port", type=int, default=d.metrics_port, help="Prometheus port (-1 = off, 0 = any)")
    s.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens)
    s.add_argument("--max-queue-tokens", type=int, default=d.max_queue_tokens)
    s.add_argument("--max-request-tokens", type=int, default=d.max_request_tokens)
    s.add_argument("--max-length", type=int, default=d.max_length)
    s.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s, dest="drain_timeout_s")
    s.add_argument("--ready-file", default=d.ready_file, help="write ports + pid as JSON here once serving")
    g = s.add_argument_group("synthetic backend")
    g.add_argument("--synthetic-hidden-size", type=int, default=d.synthetic_hidden_size)
    g.add_argument("--synthetic-num-layers", type=int, default=d.synthetic_num_layers)
    g.add_argument("--synthetic-vocab-size", type=int, default=d.synthetic_vocab_size)
    g.add_argument("--synthetic-cost-per-token-us", type=float, default=d.synthetic_cost_per_token_us,
                   help="simulated device time per token (microseconds)")
    s.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fields = {k: v for k, v in vars(args).items() if k in ServerConfig.__dataclass_fields__}
    try:
        cfg = ServerConfig(**fields)
        server = TargetServer(cfg).start()
    except SpecRelayError as e:
        print(f"target-server: error: {e}", file=sys.stderr)
        return 2

    def on_signal(signum, _frame):
        logging.getLogger("target_server").info("signal %d: draining", signum)
        threading.Thread(target=server.shutdown, kwargs={"drain": True}, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
