"""The target pool's handshake and per-request status handling against real synthetic servers:
mismatched servers (at start-up and joining later), back-pressure, invalid samples, discovery."""

import signal

import numpy as np
import pytest

from common.errors import ConfigError, ContractError
from draft_trainer.client.discovery import EndpointSource
from draft_trainer.client.dispatcher import Sample
from draft_trainer.client.pool import TargetPool
from tests.support.pool import make_samples, run_stream, syn, targets
from tests.support.procs import start_server, start_servers


def test_mismatched_servers_fail_before_training_naming_both_values(tmp_path):
    servers = start_servers(tmp_path, [("v512", syn(0)), ("v1024", syn(0, "--synthetic-vocab-size", "1024"))])
    try:
        cfg = targets(",".join(s.endpoint for s in servers))
        pool = TargetPool(EndpointSource(cfg.endpoints), cfg)
        with pytest.raises(ContractError) as err:
            pool.start()
        pool.close()
    finally:
        for s in servers:
            s.stop(signal.SIGKILL)
    msg = str(err.value)
    assert "'synthetic-v512'" in msg and "'synthetic-v1024'" in msg and "tokenizer_fingerprint" in msg
    assert "vocab_size" in msg and servers[1].endpoint in msg and servers[0].endpoint in msg


def test_late_joiner_with_another_model_is_refused_and_never_used(tmp_path):
    good, bad = start_servers(tmp_path, [("good", syn(100)), ("bad", syn(0, "--synthetic-hidden-size", "24"))])
    listing = tmp_path / "targets.txt"
    listing.write_text(good.endpoint + "\n")

    def list_bad_at_10(check, pool):
        if check.count == 10:
            listing.write_text(f"{good.endpoint}\n{bad.endpoint}\n")

    check, summary = run_stream(targets(f"file:{listing}"), make_samples(200, seed=7), [good, bad], list_bad_at_10)
    assert check.count == 200 and not check.drops
    ep = summary["endpoints"][bad.endpoint]
    assert ep["state"] == "refused" and ep["requests"] == 0 and ep["samples"] == 0, ep
    assert "hidden_size" in ep["last_error"] and "16" in ep["last_error"] and "24" in ep["last_error"]


def test_resource_exhausted_slows_the_sender_instead_of_failing(tmp_path):
    # A server whose queue holds 200 tokens: a window of 2048 tokens must be refused, then paced.
    server = start_server(tmp_path, *syn(200, "--max-queue-tokens", "200", "--max-request-tokens", "200"),
                          name="tight")
    cfg = targets(server.endpoint, request_tokens=160, max_endpoint_inflight_tokens=2048)
    check, summary = run_stream(cfg, make_samples(80, seed=8, min_len=40, max_len=80), [server])
    assert check.count == 80 and not check.drops
    assert summary["requests"].get("resource_exhausted", 0) >= 1, summary
    assert summary["retries"].get("resource_exhausted", 0) >= 1
    assert summary["endpoints"][server.endpoint]["state"] == "up"  # slowed down, never marked down


def test_invalid_sample_is_dropped_with_a_reason_and_the_rest_flow(tmp_path):
    server = start_server(tmp_path, *syn(0), name="one")
    samples = make_samples(60, seed=9)
    bad_pos = 23
    samples[bad_pos] = Sample((0, bad_pos), 4242, np.array([1, 2, 600, 3], dtype=np.int32))  # 600 >= vocab 512
    check, summary = run_stream(targets(server.endpoint, request_tokens=4096), samples, [server])
    assert check.count == 60 and check.drops == {bad_pos: "invalid_argument"}
    assert summary["dropped"] == {"invalid_argument": 1} and summary["delivered"] == 59
    assert summary["retries"].get("isolate_invalid", 0) >= 1  # its request's other samples were retried alone
    assert summary["endpoints"][server.endpoint]["state"] == "up"


def test_dns_endpoints_resolve_to_every_address(tmp_path):
    server = start_server(tmp_path, *syn(0), name="dns")
    try:
        src = EndpointSource(f"dns:localhost:{server.grpc_port}")
        eps = src.resolve()
        assert server.endpoint in eps
        check, _ = run_stream(targets(f"dns:localhost:{server.grpc_port}"), make_samples(20, seed=10))
        assert check.count == 20
    finally:
        server.stop(signal.SIGKILL)


def test_pool_sends_the_token_and_a_missing_token_fails_before_training(tmp_path):
    token = tmp_path / "token"
    token.write_text("pool-t0ken\n")
    server = start_server(tmp_path, *syn(0, "--auth-token-file", str(token)), name="auth")
    try:
        cfg = targets(server.endpoint)
        pool = TargetPool(EndpointSource(cfg.endpoints), cfg)
        with pytest.raises(ConfigError) as err:
            pool.start()
        pool.close()
        assert "UNAUTHENTICATED" in str(err.value) and server.endpoint in str(err.value)
        assert "targets.auth_token_file" in str(err.value)

        from common.security import read_token_file

        check, _ = run_stream(cfg, make_samples(30, seed=11), client_kwargs={"auth_token": read_token_file(str(token))})
        assert check.count == 30 and not check.drops
    finally:
        server.stop(signal.SIGKILL)
