"""deploy/grafana + deploy/prometheus rules: every metric the dashboard and the rules reference
exists in the code (names read from the prometheus_client definitions), every recording rule
they use is defined, and the dashboard is a well-formed Grafana dashboard covering what operators
need (supply vs demand, data-wait, loss/accuracy, per-endpoint latency and status).
"""

from __future__ import annotations

import json

import yaml

from target_server.metrics import ServerMetrics
from tests.deploy.conftest import DEPLOY, REPO
from tests.deploy.metric_names import defined_in_source, exposition_names, referenced_in_promql

DASHBOARD = DEPLOY / "grafana" / "specrelay-dashboard.json"
RULES = DEPLOY / "prometheus" / "rules" / "specrelay.rules.yml"
CODE = [REPO / "common", REPO / "target_server", REPO / "draft_trainer"]
BUILTIN = {"up"}  # series Prometheus itself creates


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def code_names() -> set[str]:
    return exposition_names(defined_in_source(CODE))


def test_source_reading_matches_the_live_registry():
    # What reading the source finds is exactly what the server registers (names and types).
    live = {(fam.name, fam.type) for fam in ServerMetrics().registry.collect()
            if fam.name.startswith("specrelay_")}  # not the process_* metrics common/metrics.py adds
    from_source = {(n.removesuffix("_total") if k == "Counter" else n, k.lower())
                   for n, k in defined_in_source(CODE).items() if n.startswith("specrelay_target_")}
    assert live == from_source


def test_every_referenced_metric_exists():
    recorded = {r["record"] for r in rules() if "record" in r}
    known = code_names() | recorded | BUILTIN
    missing = {}
    for where, exprs in (("dashboard", dashboard_exprs()), ("rules", [r["expr"] for r in rules()])):
        for expr in exprs:
            for name in referenced_in_promql(expr) - known:
                missing.setdefault(name, set()).add(where)
    assert not missing, f"metrics referenced but defined nowhere in the code: {missing}"


def test_reference_extraction_can_fail():
    assert referenced_in_promql('sum by (instance) (rate(specrelay_target_tokenz_total{status="ok"}[5m]))') == \
        {"specrelay_target_tokenz_total"}
    assert "specrelay_target_tokenz_total" not in code_names()


def test_dashboard_is_well_formed():
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in d["templating"]["list"])
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"panel {p['title']} overflows the 24-column grid"
        for cx in range(g["x"], g["x"] + g["w"]):
            for cy in range(g["y"], g["y"] + g["h"]):
                assert (cx, cy) not in cells, f"panel {p['title']} overlaps another"
                cells.add((cx, cy))
        if p["type"] != "row":
            assert p["targets"], p["title"]
            assert p["datasource"]["uid"] == "${datasource}"
            for t in p["targets"]:
                assert t["expr"].strip() and t["refId"]


def test_dashboard_covers_what_operators_need():
    used = set().union(*(referenced_in_promql(e) for e in dashboard_exprs()))
    for name in ("specrelay:target_supply_tokens:rate1m", "specrelay:trainer_demand_tokens:rate1m",  # supply vs demand
                 "specrelay:trainer_data_wait:fraction5m",                                            # data-wait
                 "specrelay_trainer_loss", "specrelay_trainer_accuracy",                              # loss / accuracy
                 "instance:specrelay_target_forward_seconds:p95_5m",                                  # per-server latency
                 "specrelay_trainer_request_seconds_bucket",                                          # request latency
                 "specrelay_trainer_endpoint_inflight_tokens",                                        # per-endpoint load
                 "up", "specrelay_target_ready", "specrelay_trainer_endpoints"):                      # per-endpoint status
        assert name in used, f"the dashboard does not show {name}"
