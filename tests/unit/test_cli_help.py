"""`draft-trainer --help` shows defaults and what each command does; `train --list-keys` lists
every config key with the comment written beside its declaration."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from common.config_help import describe_keys, format_keys
from draft_trainer.config import TrainConfig
from tests.support.procs import run_cli


@dataclass
class _Inner:
    rate: float = 0.5                # how fast
    # A block comment that heads the next field, not a continuation of `rate`.
    size: int = 3


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    name: str = "x"                  # first line
                                     # and its continuation
    bare: bool = False


def test_describe_keys_reads_trailing_comments_and_continuations():
    docs = {d.key: d for d in describe_keys(_Outer)}
    assert list(docs) == ["inner.rate", "inner.size", "name", "bare"]
    assert docs["inner.rate"].comment == "how fast" and docs["inner.rate"].default == 0.5
    assert docs["inner.size"].comment == ""           # the block comment above it is not its doc
    assert docs["name"].comment == "first line and its continuation"
    assert docs["bare"].comment == "" and docs["bare"].type == "bool"
    assert "  name (str, default x)\n      first line and its continuation" in format_keys(list(docs.values()))


def _leaf_keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None):
            yield from _leaf_keys(type(f.default_factory()), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_train_list_keys_lists_every_key_with_its_comment():
    res = run_cli("draft_trainer", "train", "--list-keys", timeout=120)
    assert res.returncode == 0, res.stderr
    listed = re.findall(r"^  (\S+) \(", res.stdout, flags=re.M)
    assert listed == list(_leaf_keys(TrainConfig))
    text = " ".join(res.stdout.split())
    assert "resume_from (str, default \"\") \"auto\" (latest checkpoint of output_dir, if any)" in text
    assert "targets.tls_root_cert (str, default \"\") PEM root that signed the servers' --tls-cert" in text
    # The pool's block comment in TargetsConfig belongs to no single key.
    assert "startup_timeout_s (float, default 300.0) wait this long for the first server at start-up " \
           "targets.refresh_interval_s" in text


def test_help_shows_defaults_and_describes_assets():
    res = run_cli("draft_trainer", "eval", "--help", timeout=120)
    assert res.returncode == 0 and "(default: 7)" in " ".join(res.stdout.split()), res.stdout
    res = run_cli("draft_trainer", "prepare-data", "--help", timeout=120)
    assert "(default: 32000)" in " ".join(res.stdout.split()) and "(default: False)" not in res.stdout
    res = run_cli("draft_trainer", "assets", "--help", timeout=120)
    text = " ".join(res.stdout.split())
    assert "fetch: SmolLM2-135M-Instruct" in text and "tiny: a tiny random model" in text and "chats.jsonl" in text
    res = run_cli("draft_trainer", "train", "--help", timeout=120)
    assert "--list-keys" in res.stdout
