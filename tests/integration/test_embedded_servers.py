"""`targets.embedded_servers`: a run with no endpoints starts that many local target servers and
spreads its samples over them (the demo's recipe runs two single-threaded ones on a CPU where the
target, not the trainer, bounds the first epoch)."""

from __future__ import annotations

import json

from tests.support.procs import run_cli


def test_two_embedded_servers_both_serve_and_every_sample_is_delivered_once(tiny_llama, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    res = run_cli("draft_trainer", "train", f"data.path={tiny_dataset}", f"output_dir={out}",
                  f"targets.embedded_model={tiny_llama}", "targets.embedded_servers=2", "targets.embedded_threads=1",
                  "targets.embedded_dtype=fp32", "targets.request_tokens=64", "targets.slow_start=false",
                  "batch_size=8", "epochs=1", "max_steps=1000", "progress=false", "data.draft_vocab_size=256",
                  "model.ttt_steps=2", "model.precision=fp32", "threads=1", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    targets = summary["pool"]
    endpoints = targets["endpoints"]
    assert len(endpoints) == 2, endpoints
    assert all(e["samples"] > 0 for e in endpoints.values()), endpoints       # both did work
    assert summary["samples_consumed"] == summary["samples_train"] == targets["delivered"]
    assert targets["duplicates"] == 0 and not summary["samples_dropped"]
    assert (out / "embedded_server.log").is_file() and (out / "embedded_server_1.log").is_file()
    assert "embedded target servers at 127.0.0.1:" in res.stderr


def test_embedded_servers_must_be_positive(tmp_path):
    res = run_cli("draft_trainer", "train", "data.path=x", "targets.embedded_model=y", f"output_dir={tmp_path}",
                  "targets.embedded_servers=0")
    assert res.returncode != 0 and "targets.embedded_servers must be > 0, got 0" in res.stderr
