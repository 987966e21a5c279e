"""target-server serve --config FILE key=value: the trainer's config system for the server;
precedence defaults < YAML < overrides < flags given explicitly; bad keys say what is wrong."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from target_server.cli import build_parser, server_config


def cfg_of(argv):
    return server_config(build_parser().parse_args(argv), argv)


def test_yaml_then_overrides_then_explicit_flags(tmp_path):
    f = tmp_path / "server.yaml"
    f.write_text("backend: synthetic\nmax_batch_tokens: 1234\nmax_queue_tokens: 5000\nsynthetic_hidden_size: 32\n")
    cfg = cfg_of(["serve", "--config", str(f), "max_queue_tokens=6000", "--synthetic-hidden-size", "48"])
    assert (cfg.backend, cfg.max_batch_tokens, cfg.max_queue_tokens, cfg.synthetic_hidden_size) == \
        ("synthetic", 1234, 6000, 48)
    assert cfg.grpc_port == 50051  # untouched defaults stay defaults
    # Without --config or overrides the flags alone decide, as before.
    assert cfg_of(["serve", "--backend", "synthetic", "--max-batch-tokens", "99"]).max_batch_tokens == 99


def test_bad_keys_and_values_are_config_errors(tmp_path):
    f = tmp_path / "server.yaml"
    f.write_text("max_batch_tokenz: 5\n")
    with pytest.raises(ConfigError, match="max_batch_tokenz"):
        cfg_of(["serve", "--config", str(f)])
    with pytest.raises(ConfigError):
        cfg_of(["serve", "max_batch_tokens=lots"])
