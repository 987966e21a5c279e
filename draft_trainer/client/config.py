"""The client's own settings: what the pool and the dispatcher read, and how to reach servers.

The trainer's `TargetsConfig` (draft_trainer/config.py) has every field below with the same
name and meaning and is passed in as is; other client commands (`regenerate`) build a
`PoolConfig` directly. The client never imports the trainer's config (tests/unit/test_client_config.py
checks the two stay in step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from common.security import read_token_file


@dataclass
class PoolConfig:
    endpoints: str = ""                    # host:port,host:port | dns:NAME:PORT | file:PATH
    teacher: Literal["hidden", "topk"] = "hidden"
    topk: int = 0
    request_timeout_s: float = 120.0       # per-request deadline; a request past it is re-issued elsewhere
    startup_timeout_s: float = 300.0       # wait this long for the first server at start-up
    refresh_interval_s: float = 10.0       # re-resolve dns:/file: endpoints this often
    unavailable_timeout_s: float = 300.0   # no server reachable this long -> stop
    request_tokens: int = 4096             # target size of one request (at least one item)
    max_inflight_tokens: int = 65536       # requested, not yet received (all servers)
    max_endpoint_inflight_tokens: int = 16384  # requested, not yet received (one server)
    slow_start: bool = True                # a (re)joined server's window starts at one item and doubles per round
                                           # trip; False: it starts full (generation, where a round trip is a
                                           # whole answer: doubling would take minutes to reach a useful batch)
    max_buffered_tokens: int = 131072      # dispatched, not yet consumed (memory bound)
    max_attempts: int = 5                  # failures of one item before it is dropped (reason target_error)
    hedge_after_s: float = 2.0             # a request blocking the consumer longer than max(this, 4x typical)
                                           # is also sent to another server; <= 0 disables
    probe_max_backoff_s: float = 10.0      # probes of a down server back off up to this interval
    auth_token_file: str = ""              # the servers' bearer token (same file as their --auth-token-file)
    tls_root_cert: str = ""                # PEM root that signed the servers' --tls-cert; enables TLS
    tls_server_name: str = ""              # name to verify when the certificate does not name the dialled address


def client_kwargs(cfg: Any) -> dict[str, Any]:
    """TargetClient keyword arguments (auth, TLS) from a PoolConfig or anything with its security fields."""
    return {"auth_token": read_token_file(cfg.auth_token_file) if cfg.auth_token_file else None,
            "tls_root_cert": cfg.tls_root_cert or None, "tls_server_name": cfg.tls_server_name or None}


def add_security_args(parser, prefix: str = "") -> None:
    """--auth-token-file / --tls-root-cert / --tls-server-name for a client command (argparse)."""
    g = parser.add_argument_group("target servers: security")
    g.add_argument(f"--{prefix}auth-token-file", default="",
                   help="file holding the servers' bearer token (the file given to their --auth-token-file)")
    g.add_argument(f"--{prefix}tls-root-cert", default="",
                   help="PEM root certificate that signed the servers' --tls-cert (switches to TLS)")
    g.add_argument(f"--{prefix}tls-server-name", default="",
                   help="name to verify in the servers' certificate when it does not name the dialled address")
