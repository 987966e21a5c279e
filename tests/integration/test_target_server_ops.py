"""Operating the server: /metrics scraped over HTTP, graceful drain on SIGTERM (health
NOT_SERVING, new work refused, in-flight work finished, bounded exit), loopback by default, and no
server left behind by a supervisor killed with -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pyarrow.flight as flight
import pytest
import torch

from common import status
from common.errors import TargetUnavailableError
from common.memory import find_jemalloc
from common.rpc import target_pb2 as pb
from draft_trainer.client.local_server import LocalServer, start_all
from draft_trainer.client.target import TargetClient
from target_server.backends.synthetic import SyntheticBackend
from target_server.cli import build_parser
from target_server.server import is_loopback
from tests.support.procs import env_with_repo, start_server


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_scraped_after_real_traffic(tmp_path):
    srv = start_server(tmp_path, "--backend", "synthetic", "--synthetic-hidden-size", "16", "--metrics-port", "0",
                       "--max-queue-tokens", "4096")
    try:
        client = TargetClient(srv.endpoint)
        seqs = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
        assert len(list(client.features([1, 2, 3], seqs))) == 3
        assert len(list(client.features([4], [[3, 3]], teacher="topk", topk=4))) == 1
        with pytest.raises(flight.FlightError):
            list(client.features([5], [[10**6]]))  # id outside the vocabulary: invalid, 1 sample dropped
        m = scrape(srv.metrics_port)
        client.close()
    finally:
        srv.stop()
    P = "specrelay_target_"
    assert m[P + 'requests_total{status="ok"}'] == 2
    assert m[P + 'requests_total{status="invalid"}'] == 1
    assert m[P + 'samples_total{outcome="served"}'] == 4
    assert m[P + 'samples_total{outcome="invalid"}'] == 1
    assert m[P + "tokens_total"] == 3 + 5 + 1 + 2
    assert m[P + "batches_total"] >= 2 and m[P + "forward_seconds_count"] == m[P + "batches_total"]
    assert m[P + "batch_tokens_count"] == m[P + "batches_total"]
    assert m[P + "bytes_sent_total"] > 11 * 3 * 16 * 4
    assert m[P + "queue_tokens"] == 0 and m[P + "held_tokens"] == 0 and m[P + "queue_limit_tokens"] == 4096
    assert m[P + "active_streams"] == 0 and m[P + "ready"] == 1
    info = [k for k in m if k.startswith(P + "model_info{")]
    assert len(info) == 1 and 'backend="synthetic"' in info[0] and 'hidden_size="16"' in info[0]
    assert 'dtype="float32"' in info[0] and 'aux_layer_ids="1,3,4"' in info[0]


def _health(client: TargetClient) -> bool:
    return client.healthy(timeout_s=5)


def test_sigterm_drains_in_flight_work_refuses_new_and_exits(tmp_path):
    # 20 ms per token, 64-token passes: the in-flight request below takes ~5 s of "device" time.
    srv = start_server(tmp_path, "--backend", "synthetic", "--synthetic-hidden-size", "16",
                       "--synthetic-cost-per-token-us", "20000", "--max-batch-tokens", "64", "--drain-timeout", "120")
    client = TargetClient(srv.endpoint, timeout_s=30)
    seqs = [[i % 500 + 1] * 32 for i in range(8)]
    got, errors = [], []

    def in_flight():
        try:
            got.extend(client.features(list(range(8)), seqs))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=in_flight)
    t.start()
    try:
        assert _health(client)
        time.sleep(0.5)  # let the request reach the server's queue
        srv.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 30
        while _health(client) and time.monotonic() < end:
            time.sleep(0.1)
        assert not _health(client), "health must report NOT_SERVING while draining"
        late = TargetClient(srv.endpoint)
        with pytest.raises(flight.FlightError) as ei:
            list(late.features([99], [[1, 2]]))
        c = status.classify(ei.value)
        assert c.code == status.UNAVAILABLE and c.retryable, ei.value
        late.close()
        t.join(timeout=120)
        assert not t.is_alive() and not errors, errors
        assert sorted(f.sample_id for f in got) == list(range(8))  # every accepted sample delivered
        ref = SyntheticBackend(hidden_size=16).forward(seqs, "hidden")
        for f in got:
            assert torch.equal(f.aux_T3H, ref[f.sample_id].aux_T3H)
        assert srv.proc.wait(timeout=60) == 0, srv.log()[-3000:]
        assert "drain complete" in srv.log()
    finally:
        client.close()
        srv.stop(signal.SIGKILL)


def test_drain_is_bounded_when_a_client_stops_reading(tmp_path):
    # ~32 MiB of features for one request, which a client opens and never reads: the stream
    # cannot finish, so the drain must give up after --drain-timeout and the process exit anyway.
    srv = start_server(tmp_path, "--backend", "synthetic", "--synthetic-hidden-size", "1024",
                       "--max-request-tokens", "4096", "--max-queue-tokens", "8192", "--drain-timeout", "2")
    fc = flight.FlightClient(f"grpc://127.0.0.1:{srv.flight_port}")
    ticket = pb.FeatureRequest(sample_ids=[1, 2], token_ids=[7] * 4096, lengths=[2048, 2048],
                               feature_schema_version=1).SerializeToString()
    try:
        reader = fc.do_get(flight.Ticket(ticket))
        time.sleep(1.0)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(timeout=90)
        took = time.monotonic() - t0
        assert code == 1, srv.log()[-3000:]  # drain cut short: non-zero, and said so
        assert "drain cut short" in srv.log()
        print(f"bounded drain exit after {took:.1f}s")
        del reader
    finally:
        fc.close()
        srv.stop(signal.SIGKILL)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit status waits for whatever reaps it: not every container's pid 1)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_local_server_exits_when_its_supervisor_is_killed(tmp_path):
    # The supervisor (a trainer with its embedded server, in miniature) starts a server through LocalServer, says
    # the server's pid, then waits; kill -9 cannot be caught, so only the server's own check can end it.
    code = ("import json, sys, time\n"
            "from draft_trainer.client.local_server import LocalServer\n"
            f"srv = LocalServer(['--backend', 'synthetic'], workdir={str(tmp_path)!r}).start()\n"
            "print(json.dumps(srv.ready), flush=True)\n"
            "time.sleep(600)\n")
    sup = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env_with_repo())
    try:
        server_pid = int(json.loads(sup.stdout.readline())["pid"])
        assert _running(server_pid)                 # serving, while its supervisor lives
        sup.kill()
        sup.wait(timeout=10)
        end = time.monotonic() + 20
        while time.monotonic() < end and _running(server_pid):
            time.sleep(0.2)
        if _running(server_pid):
            os.kill(server_pid, signal.SIGKILL)
            pytest.fail(f"server {server_pid} still running 20 s after its supervisor was killed")
        log = (tmp_path / "server.log").read_text()
        assert f"parent process {sup.pid} is gone: exiting" in log, log[-2000:]
    finally:
        sup.kill()


def test_servers_started_together_are_all_or_none(tmp_path):
    # start_all launches every server before waiting for any; when one cannot start, the started ones are stopped
    # (a trainer with embedded servers must not leave a half-started set running) and the error names the log.
    good = LocalServer(["--backend", "synthetic"], log_path=tmp_path / "good.log", workdir=tmp_path / "good")
    bad = LocalServer(["--backend", "hf", "--model", str(tmp_path / "no-such-model")], log_path=tmp_path / "bad.log",
                      workdir=tmp_path / "bad")
    with pytest.raises(TargetUnavailableError, match="bad.log"):
        start_all([good, bad])
    assert good.proc is not None and not good.alive() and not bad.alive()
    a, b = start_all([LocalServer(["--backend", "synthetic"], workdir=tmp_path / n) for n in ("a", "b")])
    try:
        assert a.alive() and b.alive() and a.endpoint != b.endpoint
    finally:
        a.stop()
        b.stop()


def test_default_bind_is_loopback():
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and is_loopback(args.host)
    assert is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def test_open_streams_are_capped(monkeypatch):
    """In-process server: with the cap at 2, a third concurrent stream is refused (retryable)."""
    import target_server.flight as tflight
    from target_server.server import ServerConfig, TargetServer

    monkeypatch.setattr(tflight, "MAX_OPEN_STREAMS", 2)
    cfg = ServerConfig(backend="synthetic", synthetic_hidden_size=8, synthetic_cost_per_token_us=50000,
                       grpc_port=0, flight_port=0, max_batch_tokens=4)
    server = TargetServer(cfg).start()
    fc = flight.FlightClient(f"grpc://127.0.0.1:{server.flight_port}")
    try:
        def ticket(i):
            return flight.Ticket(pb.FeatureRequest(request_id=f"r{i}", sample_ids=[i], token_ids=[1] * 20, lengths=[20],
                                                   feature_schema_version=1).SerializeToString())

        readers = [fc.do_get(ticket(i)) for i in range(2)]  # ~1 s of simulated work each
        end = time.monotonic() + 30
        while server._flight.open_streams < 2 and time.monotonic() < end:
            time.sleep(0.05)
        with pytest.raises(flight.FlightError) as ei:
            fc.do_get(ticket(3)).read_all()
        c = status.classify(ei.value)
        assert c.code == status.RESOURCE_EXHAUSTED and c.retry_after_s == 1.0, ei.value
        assert all(r.read_all().num_rows == 1 for r in readers)
    finally:
        fc.close()
        server.shutdown(drain=False)


@pytest.mark.parametrize("choice", ["auto", "glibc"])
def test_the_server_runs_on_jemalloc_where_present_and_says_which(tmp_path, monkeypatch, choice):
    """`target-server` re-executes itself under jemalloc as `draft-trainer` does (common/memory.py), unless told
    glibc; the process's mapped libraries show which malloc serves, and its log names it."""
    monkeypatch.setenv("SPECRELAY_MALLOC", choice)
    srv = start_server(tmp_path, "--backend", "synthetic", "--synthetic-hidden-size", "16")
    try:
        maps = open(f"/proc/{srv.proc.pid}/maps").read()
        want = "jemalloc" if choice == "auto" and find_jemalloc() else "glibc"
        assert ("libjemalloc" in maps) == (want == "jemalloc")
        log = (tmp_path / "server.log").read_text()
        assert f"malloc: {want}" in log, log[-2000:]
        assert len(list(TargetClient(srv.endpoint).features([7], [[1, 2, 3]]))) == 1   # and it serves
    finally:
        srv.stop()
