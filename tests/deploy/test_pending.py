"""tests/deploy/pending.py: interfaces the artefacts use before their code is on main. Each is
tolerated only while it is missing *and* the code it belongs to has not landed; once it exists
it must look as the artefacts expect (metrics: type and labels)."""

from __future__ import annotations

from tests.deploy import pending
from tests.deploy.conftest import REPO
from tests.deploy.metric_names import defined_with_labels

CODE = [REPO / "common", REPO / "target_server", REPO / "draft_trainer"]


def test_gates_are_known_and_evaluate():
    used = set(pending.SERVER_FLAGS.values()) | set(pending.TRAIN_KEYS.values()) | {
        g for g, _k, _l in pending.TRAINER_METRICS.values()}
    assert used <= set(pending.GATES)
    for name, gate in pending.GATES.items():
        assert gate() in (True, False), name


def test_server_flags_landed_under_the_expected_names():
    for flag in pending.missing_server_flags():
        gate = pending.SERVER_FLAGS[flag]
        assert not pending.GATES[gate](), (
            f"{gate} has landed but target-server does not accept {flag}: align deploy/ to the real flag")


def test_train_keys_landed_under_the_expected_names():
    for key in pending.missing_train_keys():
        gate = pending.TRAIN_KEYS[key]
        assert not pending.GATES[gate](), (
            f"{gate} has landed but TrainConfig has no {key}: align deploy/ to the real config key")


def test_trainer_metrics_landed_as_expected():
    defined = defined_with_labels(CODE)
    for name, (gate, kind, labels) in pending.TRAINER_METRICS.items():
        if name in defined:
            assert defined[name] == (kind, labels), (
                f"{name} is defined as {defined[name]}, the rules/dashboard expect {(kind, labels)}")
        else:
            assert not pending.GATES[gate](), (
                f"{gate} has landed without {name}: align deploy/prometheus and deploy/grafana to the real metrics")
