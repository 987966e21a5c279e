"""The client (draft_trainer/client) stands on its own: its PoolConfig/PoolMetrics, no trainer imports;
the trainer's TargetsConfig and TrainerMetrics stay compatible with what the client reads."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

from draft_trainer.client.config import PoolConfig
from draft_trainer.client.metrics import PoolMetrics
from draft_trainer.config import TargetsConfig
from draft_trainer.metrics import TrainerMetrics

CLIENT = Path(__file__).resolve().parents[2] / "draft_trainer" / "client"


def test_targets_config_has_every_pool_field_with_the_same_default():
    targets = {f.name: f.default for f in fields(TargetsConfig)}
    for f in fields(PoolConfig):
        assert f.name in targets, f"TargetsConfig lacks {f.name}, which the pool reads"
        assert targets[f.name] == f.default, f"{f.name}: TargetsConfig default {targets[f.name]!r} != {f.default!r}"


def test_trainer_metrics_are_pool_metrics():
    m = TrainerMetrics()
    assert isinstance(m, PoolMetrics)
    assert {"failovers", "inflight_tokens", "steps"} <= set(vars(m))


def test_client_imports_nothing_of_the_trainer_outside_client():
    bad = []
    for path in CLIENT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            bad += [f"{path.name}: {m}" for m in mods
                    if m.startswith("draft_trainer.") and not m.startswith("draft_trainer.client")]
    assert not bad, bad
