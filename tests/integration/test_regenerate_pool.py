"""`regenerate` on the target pool, against real target-server processes (tiny Llama, HF backend):
failover when a server is killed with SIGKILL mid-run, and the auth/TLS options every client
command shares with the trainer (token-protected and TLS servers)."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from draft_trainer.data.prepare import PrepareConfig, prepare_data
from draft_trainer.regenerate import RegenerateConfig, regenerate
from tests.support.procs import run_cli, start_servers
from tests.support.tls import self_signed_cert

TOKEN = "regen-secret-token"


def _dataset(tiny_llama, d, n: int, seed: int):
    from draft_trainer.assets import tiny_conversations

    src = d / "chats.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in tiny_conversations(n, seed=seed)))
    prepare_data(PrepareConfig(model=str(tiny_llama), inputs=[str(src)], output=str(d / "ds")), progress=False)
    return d / "ds"


def _ids(path):
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_kill9_of_one_server_mid_run_every_conversation_written_once(tiny_llama, tmp_path):
    ds = _dataset(tiny_llama, tmp_path, 48, seed=11)
    n = len((ds / "conversations.jsonl").read_text().splitlines())
    servers = start_servers(tmp_path, [(f"s{k}", ["--model", str(tiny_llama), "--metrics-port", "-1"]) for k in range(2)])
    out = tmp_path / "regen.jsonl"
    result: dict = {}
    cfg = RegenerateConfig(targets=[s.endpoint for s in servers], input=str(ds), output=str(out), max_new_tokens=24,
                           batch_size=2, concurrency=1, progress=False)
    t = threading.Thread(target=lambda: result.setdefault("report", regenerate(cfg)), daemon=True)
    try:
        t.start()
        end = time.monotonic() + 240
        while t.is_alive() and time.monotonic() < end and not (out.exists() and len(_ids(out)) >= 4):
            time.sleep(0.02)
        assert t.is_alive(), "the run finished before a server could be killed"
        servers[1].proc.send_signal(signal.SIGKILL)
        t.join(timeout=300)
        assert not t.is_alive(), "regenerate did not finish after the kill"
    finally:
        for s in servers:
            s.stop(signal.SIGKILL)
    rep = result["report"]
    ids = _ids(out)
    assert len(ids) == len(set(ids)) == n, "a conversation was written twice or not at all"
    assert rep["written"] == n and rep["skipped"] == {} and rep["output"]["duplicate_ids"] == 0
    killed = rep["per_server"][servers[1].endpoint]
    assert killed["state"] != "up" and killed["requests"] > 0  # it was sent work, then its work moved
    assert rep["dispatch"]["reissued"] >= 1 or killed["errors"] >= 1


@pytest.fixture(scope="module")
def secured(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("secured")
    token = d / "token"
    token.write_text(TOKEN + "\n")
    cert, key = self_signed_cert(d)
    ds = _dataset(tiny_llama, d, 5, seed=3)
    servers = start_servers(d, [
        ("token", ["--model", str(tiny_llama), "--auth-token-file", str(token)]),
        ("tls", ["--model", str(tiny_llama), "--auth-token-file", str(token), "--tls-cert", str(cert),
                 "--tls-key", str(key)]),
    ])
    yield {"token": token, "cert": cert, "ds": ds, "token_server": servers[0], "tls_server": servers[1]}
    for s in servers:
        s.stop()


def _cli(secured, server, out, *extra):
    return run_cli("draft_trainer", "regenerate", "--targets", server.endpoint, "--input", str(secured["ds"]),
                   "--output", str(out), "--max-new-tokens", "4", *extra, timeout=300)


def test_regenerate_reaches_a_token_protected_server(secured, tmp_path):
    n = len((secured["ds"] / "conversations.jsonl").read_text().splitlines())
    res = _cli(secured, secured["token_server"], tmp_path / "a.jsonl", "--auth-token-file", str(secured["token"]))
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(_ids(tmp_path / "a.jsonl")) == n
    res = _cli(secured, secured["token_server"], tmp_path / "b.jsonl")
    assert res.returncode != 0 and "--auth-token-file" in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]


def test_regenerate_reaches_a_tls_server(secured, tmp_path):
    n = len((secured["ds"] / "conversations.jsonl").read_text().splitlines())
    res = _cli(secured, secured["tls_server"], tmp_path / "a.jsonl", "--auth-token-file", str(secured["token"]),
               "--tls-root-cert", str(secured["cert"]))
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(_ids(tmp_path / "a.jsonl")) == n
