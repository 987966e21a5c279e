"""deploy/prometheus: promtool checks the scrape configs and rules and runs the rules' unit tests;
an integration test runs a real Prometheus server (Debian package) on 127.0.0.1 that scrapes a
real target server (and a real trainer training against it, once the trainer's metrics endpoint
is in the code), evaluates the shipped rules, and answers queries through its HTTP API.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from draft_trainer.client.target import TargetClient
from tests.deploy.conftest import DEPLOY, require_tool
from tests.support.procs import REPO, env_with_repo, start_server

PROM = DEPLOY / "prometheus"
RULES = PROM / "rules" / "specrelay.rules.yml"
CONFIGS = [PROM / "prometheus.yml", DEPLOY / "compose" / "prometheus.yml"]


def _promtool(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.parent.name)
def test_promtool_check_config(config, tmp_path):
    if config.parent.name == "compose":
        # Laid out as the compose file mounts it: /etc/prometheus/{prometheus.yml, rules/}.
        (tmp_path / "prometheus.yml").write_bytes(config.read_bytes())
        (tmp_path / "rules").symlink_to(RULES.parent)
        config = tmp_path / "prometheus.yml"
    r = _promtool("check", "config", str(config))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout


def test_promtool_check_rules():
    r = _promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    groups = yaml.safe_load(RULES.read_text())["groups"]
    names = {r.get("record") or r.get("alert") for g in groups for r in g["rules"]}
    for required in ("specrelay:target_supply_tokens:rate1m", "specrelay:trainer_demand_tokens:rate1m",
                     "specrelay:trainer_data_wait:fraction5m", "SpecRelayTargetDown", "SpecRelayDataWaitHigh",
                     "SpecRelaySamplesDropped", "SpecRelayTrainerStalled"):
        assert required in names


def test_promtool_rule_unit_tests():
    r = _promtool("test", "rules", "specrelay.rules.test.yml", cwd=RULES.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_is_unit_tested():
    tests = yaml.safe_load((RULES.parent / "specrelay.rules.test.yml").read_text())["tests"]
    tested = {a["alertname"] for t in tests for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    # Alerts without a firing test: listed here on purpose (simple thresholds on one gauge/counter).
    untested_ok = {"SpecRelayTargetNotServing", "SpecRelayTargetRequestErrors"}
    assert alerts - tested == untested_ok


# ----------------------------------------------------------------------------- a real Prometheus

def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _query(base: str, q: str) -> list:
    out = _get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': q})}")
    assert out["status"] == "success", out
    return out["data"]["result"]


def _wait(what: str, fn, timeout: float = 60.0, proc=None, log=None):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {proc.returncode}:\n{log.read_text() if log else ''}")
        try:
            last = fn()
            if last:
                return last
        except OSError as e:
            last = e
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last}\n{log.read_text() if log else ''}")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_real_prometheus_scrapes_a_target_server_and_a_trainer(tmp_path, tiny_llama, tiny_dataset):
    """A target server and a trainer, scraped by a real Prometheus with the shipped rules."""
    prometheus = require_tool("prometheus")
    srv = start_server(tmp_path, "--backend", "hf", "--model", str(tiny_llama), "--metrics-port", "0")
    prom_port, trainer_metrics = _free_ports(2)
    jobs = [{"job_name": "specrelay-target", "static_configs": [{"targets": [f"127.0.0.1:{srv.metrics_port}"]}]}]
    jobs.append({"job_name": "specrelay-trainer", "static_configs": [{"targets": [f"127.0.0.1:{trainer_metrics}"]}]})
    cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(RULES)],
           "scrape_configs": jobs}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}",
                                 "--log.level=warn"], stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{prom_port}"
    client = TargetClient(srv.endpoint)
    trainer = None
    try:
        # The first scrape sees the server idle; traffic after it makes rate() positive.
        _wait("the first scrape", lambda: _query(base, 'up{job="specrelay-target"} == 1'), proc=proc, log=log)
        seqs = [[1 + (i * 7 + j) % 500 for j in range(20 + i)] for i in range(6)]
        sent = 0
        for rnd in range(3):
            got = list(client.features(list(range(rnd * 10, rnd * 10 + len(seqs))), seqs))
            assert len(got) == len(seqs)
            sent += sum(len(s) for s in seqs)
            time.sleep(1.2)
        # The raw counter equals what the server computed for us, to the token.
        res = _wait("tokens counter", lambda: [r for r in _query(base, "specrelay_target_tokens_total")
                                               if float(r["value"][1]) == sent], proc=proc, log=log)
        assert res[0]["metric"]["job"] == "specrelay-target"
        # The shipped recording rule sees the supply.
        _wait("supply recording rule",
              lambda: [r for r in _query(base, "specrelay:target_supply_tokens:rate1m") if float(r["value"][1]) > 0],
              proc=proc, log=log)
        assert [float(r["value"][1]) for r in _query(base, "specrelay_target_ready")] == [1.0]
        info = _query(base, "specrelay_target_model_info")
        assert info and info[0]["metric"]["backend"] == "hf"
        # A real trainer against the server, scraped while it trains.
        with open(tmp_path / "trainer.log", "wb") as tlog:
            trainer = subprocess.Popen(
                [sys.executable, "-m", "draft_trainer", "train", f"data.path={tiny_dataset}",
                 f"targets.endpoints={srv.endpoint}", f"output_dir={tmp_path / 'run'}", "max_steps=100000",
                 "epochs=1000", "batch_size=2", "model.ttt_steps=2", "log_every=1000",
                 "metrics_host=127.0.0.1", f"metrics_port={trainer_metrics}"],
                stdout=tlog, stderr=subprocess.STDOUT, env=env_with_repo(), cwd=REPO)
        consumed = _wait("trainer samples consumed", lambda: [
            r for r in _query(base, 'specrelay_trainer_samples_consumed_total{job="specrelay-trainer"}')
            if float(r["value"][1]) > 0], proc=proc, log=log, timeout=120)
        assert consumed[0]["metric"]["instance"] == f"127.0.0.1:{trainer_metrics}"
        wait = _wait("data-wait recording rule", lambda: _query(base, "specrelay:trainer_data_wait:fraction5m"),
                     proc=proc, log=log)
        assert 0.0 <= float(wait[0]["value"][1]) <= 1.0
        # Every shipped rule loaded and evaluates without error against real data.
        rules = _get(f"{base}/api/v1/rules")["data"]["groups"]
        evaluated = [r for g in rules for r in g["rules"]]
        assert len(evaluated) == sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
        assert all(r["health"] in ("ok", "unknown") for r in evaluated), [(r["name"], r.get("lastError")) for r in evaluated]
        firing = {a["labels"]["alertname"] for a in _get(f"{base}/api/v1/alerts")["data"]["alerts"]}
        assert not firing & {"SpecRelayTargetDown", "SpecRelayNoTargetServing"}
    finally:
        client.close()
        if trainer is not None:
            _stop(trainer)
        _stop(proc)
        srv.stop()
