"""Bearer-token auth on both planes (UNAUTHENTICATED without it) and TLS on both planes, against
real server processes; the health service stays open for probes."""

from __future__ import annotations

import urllib.request

import pyarrow.flight as flight
import pytest

from common import status
from common.errors import TargetUnavailableError
from draft_trainer.client.target import TargetClient
from tests.support.procs import start_server
from tests.support.tls import self_signed_cert

TOKEN = "t0ken-for-tests"
SYNTH = ["--backend", "synthetic", "--synthetic-hidden-size", "16", "--metrics-port", "0"]


@pytest.fixture(scope="module")
def secrets(tmp_path_factory):
    d = tmp_path_factory.mktemp("secrets")
    token = d / "token"
    token.write_text(TOKEN + "\n")
    cert, key = self_signed_cert(d)
    other_cert, _ = self_signed_cert(d, "other")
    return {"token": token, "cert": cert, "key": key, "other_cert": other_cert}


@pytest.fixture(scope="module")
def token_server(secrets, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("tok"), *SYNTH, "--auth-token-file", str(secrets["token"]))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tls_server(secrets, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("tls"), *SYNTH, "--auth-token-file", str(secrets["token"]),
                       "--tls-cert", str(secrets["cert"]), "--tls-key", str(secrets["key"]))
    yield srv
    srv.stop()


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def _assert_rejected(client: TargetClient) -> None:
    with pytest.raises(TargetUnavailableError, match="UNAUTHENTICATED"):
        client.model_info()
    with pytest.raises(TargetUnavailableError, match="UNAUTHENTICATED"):
        client.fetch_tensors(["lm_head"])
    with pytest.raises(TargetUnavailableError, match="UNAUTHENTICATED"):
        client.generate([("p", [1, 2])], max_new_tokens=2)


def _assert_flight_rejected(location: str, headers, **kw) -> None:
    from common.rpc import target_pb2 as pb

    ticket = flight.Ticket(pb.FeatureRequest(sample_ids=[1], token_ids=[1, 2], lengths=[2],
                                             feature_schema_version=1).SerializeToString())
    fc = flight.FlightClient(location, **kw)
    try:
        with pytest.raises(flight.FlightError) as ei:
            fc.do_get(ticket, options=flight.FlightCallOptions(headers=headers, timeout=30)).read_all()
        assert status.classify(ei.value).code == status.UNAUTHENTICATED, ei.value
        assert not status.classify(ei.value).retryable
    finally:
        fc.close()


def test_token_required_on_both_planes(token_server):
    good = TargetClient(token_server.endpoint, auth_token=TOKEN)
    try:
        info = good.model_info()
        (f,) = good.features([1], [[1, 2, 3]])
        assert f.aux_T3H.shape == (3, 48)
        assert set(good.fetch_tensors(["lm_head"])) == {"lm_head"}
    finally:
        good.close()
    for bad in (TargetClient(token_server.endpoint), TargetClient(token_server.endpoint, auth_token="wrong")):
        assert bad.healthy()  # probes need no token
        _assert_rejected(bad)
        bad.close()
    loc = f"grpc://127.0.0.1:{info.flight_port}"
    _assert_flight_rejected(loc, [])
    _assert_flight_rejected(loc, [(b"authorization", b"Bearer wrong")])
    _assert_flight_rejected(loc, [(b"authorization", TOKEN.encode())])  # scheme missing
    text = _scrape(token_server.metrics_port)
    assert _metric(text, 'specrelay_target_auth_failures_total{plane="grpc"}') >= 6
    assert _metric(text, 'specrelay_target_auth_failures_total{plane="flight"}') >= 3
    assert _metric(text, 'specrelay_target_requests_total{status="ok"}') == 1
    assert _metric(text, 'specrelay_target_requests_total{status="unauthenticated"}') == 3  # the DoGets


def test_tls_on_both_planes_with_token(tls_server, secrets):
    good = TargetClient(tls_server.endpoint, auth_token=TOKEN, tls_root_cert=str(secrets["cert"]))
    try:
        info = good.model_info()
        got = list(good.features([1, 2], [[5, 6, 7], [8]]))
        assert sorted(f.sample_id for f in got) == [1, 2]
        assert set(good.fetch_tensors([])) == {"embed_tokens", "lm_head", "final_norm"}
    finally:
        good.close()
    # TLS but no token: rejected; the data plane over TLS rejects too.
    no_token = TargetClient(tls_server.endpoint, tls_root_cert=str(secrets["cert"]))
    assert no_token.healthy()
    _assert_rejected(no_token)
    no_token.close()
    _assert_flight_rejected(f"grpc+tls://127.0.0.1:{info.flight_port}", [],
                            tls_root_certs=secrets["cert"].read_bytes())
    # Plaintext, or a certificate the client does not trust: no connection (and the server lives on).
    for kw in ({}, {"tls_root_cert": str(secrets["other_cert"])}):
        c = TargetClient(tls_server.endpoint, auth_token=TOKEN, timeout_s=5, **kw)
        assert not c.healthy()
        with pytest.raises(TargetUnavailableError, match="UNAVAILABLE"):
            c.model_info()
        c.close()
    again = TargetClient(tls_server.endpoint, auth_token=TOKEN, tls_root_cert=str(secrets["cert"]))
    assert len(list(again.features([3], [[1]]))) == 1
    again.close()


def test_bad_security_flags_are_config_errors(tmp_path, secrets):
    from tests.support.procs import run_cli

    res = run_cli("target_server", "serve", *SYNTH, "--tls-cert", str(secrets["cert"]), timeout=120)
    assert res.returncode == 2 and "--tls-cert and --tls-key go together" in res.stderr
    res = run_cli("target_server", "serve", *SYNTH, "--auth-token-file", str(tmp_path / "missing"), timeout=120)
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_trainer_trains_against_a_secured_server(secrets, tiny_llama, tiny_dataset, tmp_path):
    from tests.support.procs import run_cli

    srv = start_server(tmp_path, "--model", str(tiny_llama), "--backend", "hf", "--auth-token-file",
                       str(secrets["token"]), "--tls-cert", str(secrets["cert"]), "--tls-key", str(secrets["key"]))
    try:
        common = ["draft_trainer", "train", f"targets.endpoints={srv.endpoint}", f"data.path={tiny_dataset}",
                  "max_steps=2", "batch_size=2", "model.ttt_steps=2", f"targets.tls_root_cert={secrets['cert']}",
                  "targets.startup_timeout_s=20"]
        res = run_cli(*common, f"output_dir={tmp_path / 'ok'}", f"targets.auth_token_file={secrets['token']}",
                      timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert len((tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()) == 2
        res = run_cli(*common, f"output_dir={tmp_path / 'no'}", timeout=600)  # no token
        assert res.returncode != 0 and "UNAUTHENTICATED" in res.stderr, res.stderr[-3000:]
    finally:
        srv.stop()
