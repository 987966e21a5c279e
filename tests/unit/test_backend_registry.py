"""The backend registry: one table from --backend to class, per-backend option sections enforced."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from target_server.backends.base import Backend
from target_server.backends.registry import BACKENDS, backend_class
from target_server.cli import build_parser
from target_server.server import ServerConfig


def test_every_entry_names_a_backend_class_with_from_config():
    for name in BACKENDS:
        cls = backend_class(name)  # sglang's package imports without SGLang (its own test checks that)
        assert issubclass(cls, Backend) and cls.name == name
        assert callable(getattr(cls, "from_config", None)), name


def test_cli_offers_exactly_the_registered_backends():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    (action,) = [a for a in serve._actions if a.dest == "backend"]
    assert list(action.choices) == list(BACKENDS)


@pytest.mark.parametrize("kw,match", [
    (dict(backend="hf", model="m", tp=2), r"--tp 2 needs --backend sglang \(the hf backend does not use it\)"),
    (dict(backend="hf", model="m", synthetic_hidden_size=32), r"--synthetic-hidden-size 32 needs --backend synthetic"),
    (dict(backend="sglang", model="m", synthetic_cost_per_token_us=5.0), r"--synthetic-cost-per-token-us 5.0 needs"),
    (dict(backend="synthetic", tp=2), r"--tp 2 needs --backend sglang"),
    (dict(backend="synthetic", batch_invariant=True), r"--batch-invariant True needs --backend hf or sglang \(the "
                                                      r"synthetic backend does not use it\)"),
    (dict(backend="hf"), r"--model: required for the hf, sglang backends"),
    (dict(backend="vllm", model="m"), r"'vllm' is not one of hf, synthetic, sglang"),
])
def test_options_of_another_backend_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        ServerConfig(**kw).validate()


def test_own_section_and_shared_options_are_accepted():
    ServerConfig(backend="synthetic", synthetic_hidden_size=32, max_topk=8).validate()
    ServerConfig(backend="sglang", model="m", tp=2, max_topk=8).validate()
    ServerConfig(backend="sglang", model="m", batch_invariant=True).validate()  # read by hf and sglang
    ServerConfig(backend="hf", model="m", batch_invariant=True).validate()
    ServerConfig(backend="hf", model="m", tp=1, max_topk=8).validate()  # defaults of other sections are fine
