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


@pytest.mark.parametrize("argv, prefers", [
    (["serve", "--backend", "hf", "--model", "m"], True),
    (["serve", "--backend=sglang", "--model", "m"], False),
    (["serve", "--config", "FILE"], False),                          # the backend named in the YAML counts too
    (["serve", "--config", "FILE", "backend=hf"], True),             # an override beats the YAML
    (["serve", "--config", "FILE", "backend=hf", "--backend", "sglang"], False),   # an explicit flag beats both
    (["serve", "--config", "MISSING"], True),                        # unreadable: main reports it
    (["serve"], True),                                               # the default backend, hf
])
def test_the_command_chooses_jemalloc_except_for_the_sglang_engine(tmp_path, monkeypatch, argv, prefers):
    import common.memory
    import target_server.cli
    from target_server import entry

    (tmp_path / "s.yaml").write_text("backend: sglang\nmodel: m\n")
    argv = [a.replace("MISSING", str(tmp_path / "none.yaml")).replace("FILE", str(tmp_path / "s.yaml")) for a in argv]
    calls = []
    monkeypatch.setattr(entry.sys, "argv", ["target-server", *argv])
    monkeypatch.setattr(common.memory, "prefer_jemalloc", lambda: calls.append("prefer"))
    monkeypatch.setattr(target_server.cli, "main", lambda: calls.append("main") or 0)
    assert entry.console_main() == 0
    assert calls == (["prefer", "main"] if prefers else ["main"])
    if "none.yaml" not in " ".join(argv):    # the same backend as the server's own config system reads
        assert (cfg_of(argv).backend == "sglang") == (not prefers)
