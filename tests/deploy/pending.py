"""Interfaces the deploy artefacts use that other issues define but main does not have yet.

Every entry names a *gate*: a check that the code it belongs to has landed. While an entry is
missing from the code and its gate is closed, the tests tolerate it (they strip the flag or key
before handing the rest to the real parser). Once it exists, the real code checks it like
everything else (and a metric must have the expected type and labels). If the gate opens but
the entry is still missing, the interface landed under another name: test_pending.py fails
and the artefacts must be aligned.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _server_accepts(flag: str) -> bool:
    from target_server.cli import build_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse prints its usage on the way out
            build_parser().parse_args(["serve", f"{flag}=x"])
    except SystemExit:
        return False
    return True


def _train_accepts(key: str) -> bool:
    from common.config import parse_overrides
    from common.errors import ConfigError
    from draft_trainer.config import TrainConfig

    try:
        parse_overrides([f"{key}=x"], TrainConfig)
    except ConfigError:
        return False
    return True


def _targets_fields() -> set[str]:
    from draft_trainer.config import TargetsConfig

    return set(TargetsConfig.__dataclass_fields__)


# Gates: True once the code an entry depends on is on the branch.
GATES = {
    # issue 3: the server's auth/TLS change (it adds --tls-cert together with --auth-token-file)
    "server-security": lambda: _server_accepts("--tls-cert"),
    # issue 3/7: the trainer side of the bearer token (any token field in TargetsConfig)
    "trainer-auth": lambda: any("token" in f and "tokens" not in f for f in _targets_fields()),
    # issue 7: the target pool, which brings draft_trainer/metrics.py and the metrics_* config keys
    "pool": lambda: (REPO / "draft_trainer" / "metrics.py").is_file(),
    # issue 8: the FSDP trainer (draft_trainer/train/parallel.py on the trainer branch)
    "fsdp-trainer": lambda: (REPO / "draft_trainer" / "train" / "parallel.py").is_file(),
}

# target-server serve flags used by deploy/k8s, deploy/compose.
SERVER_FLAGS = {"--auth-token-file": "server-security"}

# TrainConfig keys (dotted) used in the deploy/k8s and deploy/compose trainer configs.
TRAIN_KEYS = {
    "targets.auth_token_file": "trainer-auth",
    "metrics_host": "pool",  # trainer /metrics bind address; pods need 0.0.0.0
    "metrics_port": "pool",  # trainer /metrics port (base port + local rank per issue 8)
}

# The trainers' DNS re-resolution interval for dns: endpoints (issue 7: targets.refresh_interval_s,
# 10 s by default on the pool branch). Used until TargetsConfig has the field.
DNS_REFRESH_S = 10.0

# Trainer metrics the rules and the dashboard use: base name -> (gate, type, label names).
# The pool's are exactly as the pool branch defines them (draft_trainer/metrics.py); the FSDP
# trainer's follow issue 8's wording.
TRAINER_METRICS = {
    "specrelay_trainer_data_wait_seconds": ("pool", "Counter", ()),
    "specrelay_trainer_samples_consumed": ("pool", "Counter", ()),
    "specrelay_trainer_samples_dropped": ("pool", "Counter", ("reason",)),
    "specrelay_trainer_endpoints": ("pool", "Gauge", ("state",)),
    "specrelay_trainer_endpoint_inflight_tokens": ("pool", "Gauge", ("endpoint",)),
    "specrelay_trainer_request_seconds": ("pool", "Histogram", ()),
    "specrelay_trainer_retries": ("pool", "Counter", ("reason",)),
    "specrelay_trainer_failovers": ("pool", "Counter", ()),
    "specrelay_trainer_tokens": ("fsdp-trainer", "Counter", ()),          # demand: tokens trained on
    "specrelay_trainer_steps": ("fsdp-trainer", "Counter", ()),
    "specrelay_trainer_loss": ("fsdp-trainer", "Gauge", ()),
    "specrelay_trainer_accuracy": ("fsdp-trainer", "Gauge", ("position",)),  # per TTT step
}


def missing_server_flags() -> set[str]:
    return {f for f in SERVER_FLAGS if not _server_accepts(f)}


def missing_train_keys() -> set[str]:
    return {k for k in TRAIN_KEYS if not _train_accepts(k)}
