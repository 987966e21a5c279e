"""`target-server serve ...`: run a target server until SIGTERM/SIGINT, then drain and exit.

Exit status: 0 after a complete drain, 1 if the drain was cut short (work left unfinished),
2 on a configuration error. A second signal, or a drain that overruns its bound, exits at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading

from common.config import load_config
from common.errors import SpecRelayError
from common.hardware import DTYPE_CHOICES
from common.memory import describe_allocator, tune_malloc
from target_server.backends.registry import BACKENDS
from target_server.server import CLOSE_TIMEOUT_S, ServerConfig, TargetServer

log = logging.getLogger("target_server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="target-server", description="SpecRelay target server")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve EAGLE-3 features for a target model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = ServerConfig()
    m = s.add_argument_group("model")
    m.add_argument("--model", default=d.model, help="local HF model directory (hf, sglang backends)")
    m.add_argument("--backend", default=d.backend, choices=list(BACKENDS),
                   help="hf: transformers (CPU or one GPU); sglang: SGLang's model runner; synthetic: test features")
    m.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N")
    m.add_argument("--dtype", default=d.dtype, choices=DTYPE_CHOICES,
                   help="model compute dtype, also the wire dtype of hidden states (auto: bf16 on a GPU or CPU "
                        "that computes it natively, i.e. CUDA with bf16, AVX512-BF16 or AMX; else fp32)")
    m.add_argument("--tp", type=int, default=d.tp, help="tensor-parallel ranks (sglang backend; one GPU each)")
    m.add_argument("--aux-layers", default=d.aux_layers, help="'auto' = [1, L//2-1, L-4], or i,j,k (0-indexed)")
    m.add_argument("--max-length", type=int, default=d.max_length, help="longest sample (0 = the model's)")
    m.add_argument("--max-topk", type=int, default=d.max_topk, help="largest k for teacher=topk requests")
    m.add_argument("--batch-invariant", action="store_true", default=d.batch_invariant,
                   help="a sample's features do not depend on what it is batched with (hf and sglang backends: "
                        "one sample per forward pass, unpadded; makes a resumed training run bit-exact; on a GPU it "
                        "gives up batching)")
    n = s.add_argument_group("network")
    n.add_argument("--host", default=d.host, help="bind address (all interfaces, 0.0.0.0, must be explicit)")
    n.add_argument("--grpc-port", type=int, default=d.grpc_port, help="control plane port (0 = any free)")
    n.add_argument("--flight-port", type=int, default=d.flight_port, help="data plane port (0 = any free)")
    n.add_argument("--metrics-port", type=int, default=d.metrics_port, help="Prometheus /metrics port (-1 = off, 0 = any)")
    n.add_argument("--auth-token-file", default=d.auth_token_file,
                   help="require 'authorization: Bearer <token in this file>' on gRPC and Flight")
    n.add_argument("--tls-cert", default=d.tls_cert, help="PEM certificate chain: serve both ports over TLS")
    n.add_argument("--tls-key", default=d.tls_key, help="PEM private key for --tls-cert")
    n.add_argument("--ready-file", default=d.ready_file, help="write ports + pid as JSON here once serving")
    n.add_argument("--parent-pid", type=int, default=d.parent_pid,
                   help="exit (without a drain: no one is left to read it) once this process is gone; a supervisor "
                        "passes its own pid so that a kill -9 of it leaves no server behind (0 = off)")
    c = s.add_argument_group("scheduling")
    c.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens, help="padded tokens per forward pass")
    c.add_argument("--max-queue-tokens", type=int, default=d.max_queue_tokens,
                   help="queued tokens before requests are refused with RESOURCE_EXHAUSTED")
    c.add_argument("--max-request-tokens", type=int, default=d.max_request_tokens, help="tokens in one request")
    c.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s, dest="drain_timeout_s",
                   help="seconds to finish accepted work after SIGTERM")
    g = s.add_argument_group("synthetic backend")
    g.add_argument("--synthetic-hidden-size", type=int, default=d.synthetic_hidden_size)
    g.add_argument("--synthetic-num-layers", type=int, default=d.synthetic_num_layers)
    g.add_argument("--synthetic-vocab-size", type=int, default=d.synthetic_vocab_size)
    g.add_argument("--synthetic-cost-per-token-us", type=float, default=d.synthetic_cost_per_token_us,
                   help="simulated device time per token (microseconds)")
    s.add_argument("--log-level", default="INFO")
    s.add_argument("--config", default=None,
                   help="YAML file of server settings (the flags' names with _, e.g. max_batch_tokens: 16384); "
                        "flags given on the command line win over it")
    s.add_argument("overrides", nargs="*", metavar="key=value",
                   help="setting overrides applied after --config (same names), e.g. max_batch_tokens=16384")
    return p


def _explicit(argv: list[str] | None) -> dict:
    """The ServerConfig fields given as flags on this command line (not defaults)."""
    p = build_parser()
    serve = p._subparsers._group_actions[0].choices["serve"]
    for a in serve._actions:
        if a.dest != "help":
            a.default = argparse.SUPPRESS
    return {k: v for k, v in vars(p.parse_args(argv)).items() if k in ServerConfig.__dataclass_fields__}


def server_config(args: argparse.Namespace, argv: list[str] | None) -> ServerConfig:
    """Defaults < --config YAML < key=value overrides < flags given explicitly (the same config
    system as the trainer: common.config)."""
    if not args.config and not args.overrides:
        return ServerConfig(**{k: v for k, v in vars(args).items() if k in ServerConfig.__dataclass_fields__})
    return dataclasses.replace(load_config(ServerConfig, args.config, args.overrides), **_explicit(argv))


def _exit(code: int) -> None:
    # os._exit: native Flight/gRPC threads must not hold the process open after the drain.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_malloc()  # glibc: multi-MiB feature tensors reuse heap memory instead of page-faulting it in
    log.info("malloc: %s", describe_allocator())
    try:
        cfg = server_config(args, argv)
        server = TargetServer(cfg).start()
    except SpecRelayError as e:
        print(f"target-server: error: {e}", file=sys.stderr)
        return 2

    signals = []

    def on_signal(signum, _frame):
        signals.append(signum)
        if len(signals) > 1:
            log.warning("second signal: exiting without finishing the drain")
            _exit(1)
        log.info("signal %d: draining (up to %.0fs); health is NOT_SERVING", signum, cfg.drain_timeout_s)
        threading.Thread(target=server.shutdown, kwargs={"drain": True}, name="drain", daemon=True).start()
        # The bound on the whole exit, whatever a client or the backend does.
        watchdog = threading.Timer(cfg.drain_timeout_s + 2 * CLOSE_TIMEOUT_S + 5.0, _watchdog)
        watchdog.daemon = True
        watchdog.start()

    def _watchdog():
        log.error("shutdown overran its bound; exiting")
        _exit(1)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not server.wait(timeout=1.0):
        if cfg.parent_pid and os.getppid() != cfg.parent_pid:   # reparented: the supervisor is gone
            log.warning("parent process %d is gone: exiting (no one is left to read a drain)", cfg.parent_pid)
            _exit(1)
    _exit(0 if server.drained_cleanly else 1)
    return 0  # not reached


if __name__ == "__main__":   # the command (malloc choice included) is target_server/entry.py
    sys.exit(main())
