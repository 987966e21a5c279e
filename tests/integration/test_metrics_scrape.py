"""/metrics as Prometheus scrapes it, from a real target server process and a trainer registry
served over HTTP: process metrics on both sides, no *_created series, and no held-out
acceptance length until an evaluation has produced one."""

from __future__ import annotations

import signal
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from common.metrics import serve_metrics
from tests.support.procs import start_server

PROCESS = {"process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds"}


def scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "_created" not in text, [line for line in text.splitlines() if "_created" in line][:5]
    return {fam.name: fam.samples for fam in text_string_to_metric_families(text)}


def test_target_server_metrics(tmp_path):
    srv = start_server(tmp_path, "--backend", "synthetic", "--synthetic-hidden-size", "16", "--metrics-port", "0")
    try:
        fams = scrape(srv.metrics_port)
        assert PROCESS <= set(fams), sorted(set(fams))
        rss = fams["process_resident_memory_bytes"][0].value
        assert rss > 10 << 20  # a Python process with torch imported: tens of MB at least
        assert fams["process_open_fds"][0].value >= 3
        assert "specrelay_target_tokens" in fams  # the server's own metrics are still there
    finally:
        assert srv.stop(signal.SIGTERM) == 0, srv.log()[-2000:]


def test_trainer_metrics_and_eval_gauge_only_after_an_evaluation():
    from draft_trainer.metrics import TrainerMetrics

    m = TrainerMetrics()
    port = serve_metrics(m.registry, "127.0.0.1", 0)
    fams = scrape(port)
    assert PROCESS <= set(fams)
    assert fams["process_open_fds"][0].value >= 3 and fams["process_cpu_seconds"][0].value > 0
    assert "specrelay_trainer_eval_sim_accept_len" not in fams  # no evaluation yet: absent, not 0
    assert "specrelay_trainer_steps" in fams
    m.eval_sim_accept_len.set(2.5)
    m.eval_sim_accept_len.set(2.75)
    fams = scrape(port)
    assert [s.value for s in fams["specrelay_trainer_eval_sim_accept_len"]] == [2.75]
