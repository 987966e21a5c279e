"""The target pool against real synthetic servers on 127.0.0.1: servers die, join, come back, lag.

Every test checks the same invariant: each sample is delivered exactly once, in the source
order, with exactly the features a local synthetic backend computes for its tokens.
"""

import signal
import time

import pytest

from common.errors import TargetUnavailableError
from draft_trainer.client.discovery import EndpointSource
from draft_trainer.client.dispatcher import Dispatcher
from draft_trainer.client.pool import TargetPool
from tests.support.pool import Checker, in_thread, make_samples, open_stream, run_stream, syn, targets
from tests.support.procs import start_server, start_servers


def test_kill_one_of_three_mid_run(tmp_path):
    servers = start_servers(tmp_path, [(f"s{i}", syn(150)) for i in range(3)])
    victim = servers[1]
    seen = {}

    def kill_at_60(check, pool):
        if check.count == 60:
            seen["served_before"] = pool.endpoints[victim.endpoint].samples
            victim.stop(signal.SIGKILL)

    check, summary = run_stream(targets(",".join(s.endpoint for s in servers)), make_samples(240), servers,
                                kill_at_60)
    served_before = seen["served_before"]
    assert check.count == 240 and not check.drops
    assert served_before > 0
    ep = summary["endpoints"][victim.endpoint]
    assert ep["state"] == "down" and ep["errors"] >= 1
    assert summary["reissued"] >= 1, summary  # the victim had work in flight; it was answered elsewhere
    assert summary["delivered"] == summary["pulled"] == summary["dispatched"] == 240
    others = [summary["endpoints"][s.endpoint]["samples"] for s in servers if s is not victim]
    assert all(n > 0 for n in others)


def test_fourth_server_joins_through_the_endpoint_file(tmp_path):
    servers = start_servers(tmp_path, [(f"s{i}", syn(150)) for i in range(3)])
    listing = tmp_path / "targets.txt"
    listing.write_text("# the pool re-reads this file\n" + "\n".join(s.endpoint for s in servers) + "\n")
    state = {}

    def add_fourth():
        state["new"] = start_server(tmp_path, *syn(150), name="s3")
        listing.write_text(listing.read_text() + state["new"].endpoint + "\n")

    def source():
        # Produce until the newcomer has served work (bounded), so the test does not race its start-up.
        for s in make_samples(4000, seed=1):
            new = state.get("new")
            if new is not None and new.endpoint in pool.endpoints and pool.endpoints[new.endpoint].samples >= 20:
                return
            yield s

    cfg = targets(f"file:{listing}")
    pool = TargetPool(EndpointSource(cfg.endpoints), cfg)
    pool.start()
    stream = Dispatcher(pool, source(), cfg).start()
    check = Checker()
    starter = None
    try:
        for d in stream:
            check(d)
            if check.count == 20:
                starter = in_thread(add_fourth)
        summary = stream.summary()
    finally:
        stream.close()
        pool.close()
        if starter is not None:
            starter.join(timeout=120)
        for s in [*servers, state.get("new")]:
            if s is not None:
                s.stop(signal.SIGKILL)
    new = summary["endpoints"][state["new"].endpoint]
    assert new["state"] == "up" and new["samples"] >= 20, summary
    assert check.count < 4000  # stopped because the newcomer served, not because the source ran out
    assert summary["delivered"] == summary["pulled"] == check.count


def test_server_removed_from_the_file_is_drained(tmp_path):
    servers = start_servers(tmp_path, [(f"s{i}", syn(100)) for i in range(2)])
    listing = tmp_path / "targets.txt"
    listing.write_text("\n".join(s.endpoint for s in servers))
    seen = {}

    def remove_at_40(check, pool):
        if check.count == 40:
            leaving = seen["leaving"] = pool.endpoints[servers[1].endpoint]
            listing.write_text(servers[0].endpoint + "\n")
            end = time.monotonic() + 10
            while leaving.state == "up" and time.monotonic() < end:
                time.sleep(0.02)
            assert leaving.state == "draining"
            seen["requests_at_drain"] = leaving.requests

    check, summary = run_stream(targets(f"file:{listing}"), make_samples(400, seed=2), servers, remove_at_40)
    leaving = seen["leaving"]
    assert check.count == 400 and not check.drops
    assert leaving.samples > 0 and leaving.requests == seen["requests_at_drain"]  # finished its work, got nothing new
    assert servers[1].endpoint not in summary["endpoints"]                # then removed from the pool


def test_all_servers_down_then_one_back_on_the_same_port(tmp_path):
    servers = start_servers(tmp_path, [(f"s{i}", syn(100)) for i in range(2)])
    started = []

    def outage_at_30(check, pool):
        if check.count == 30:
            for s in servers:
                s.stop(signal.SIGKILL)
            time.sleep(1.0)  # the pool notices, marks both down and probes in vain
            assert pool.num_up() == 0
            started.append(start_server(tmp_path, *syn(100), "--grpc-port", str(servers[0].grpc_port), name="back"))

    check, summary = run_stream(targets(",".join(s.endpoint for s in servers), unavailable_timeout_s=60),
                                make_samples(160, seed=3), started, outage_at_30)
    assert check.count == 160 and not check.drops
    ep = summary["endpoints"][servers[0].endpoint]
    assert ep["state"] == "up"
    assert summary["endpoints"][servers[1].endpoint]["state"] == "down"


def test_no_server_for_too_long_is_a_clear_error_not_a_hang(tmp_path):
    server = start_server(tmp_path, *syn(200), name="only")
    samples = make_samples(200, seed=4)
    pool, stream = open_stream(targets(server.endpoint, unavailable_timeout_s=1.5), samples)
    check = Checker(samples)
    try:
        with pytest.raises(TargetUnavailableError) as err:
            for d in stream:
                check(d)
                if check.count == 10:
                    server.stop(signal.SIGKILL)
    finally:
        stream.close()
        pool.close()
    msg = str(err.value)
    assert "no target server reachable" in msg and server.endpoint in msg and "unavailable_timeout_s" in msg
    assert 10 <= check.count < 200  # everything received before the outage was still handed out, in order


def test_slow_server_gets_less_work(tmp_path):
    servers = start_servers(tmp_path, [("fast0", syn(50)), ("fast1", syn(50)), ("slow", syn(1000))])
    check, summary = run_stream(targets(",".join(s.endpoint for s in servers), hedge_after_s=0.5),
                                make_samples(300, seed=5), servers)
    assert check.count == 300 and not check.drops
    n = {s.endpoint: summary["endpoints"][s.endpoint]["samples"] for s in servers}
    slow = n[servers[2].endpoint]
    assert slow < n[servers[0].endpoint] and slow < n[servers[1].endpoint], n


def test_a_slow_servers_window_stays_inside_the_deadline(tmp_path):
    # 0.5 ms per token and a 2 s deadline: each 256-token request takes ~0.13 s, but the default window
    # (16,384 tokens, ~8 s of queue) would make the requests at its tail outlive their deadline. The window
    # is held to what the server computes in half the deadline, so nothing times out (this server is the
    # only one: a timeout would mark it down and recompute its queue).
    [server] = start_servers(tmp_path, [("slow", syn(500))])
    cfg = targets(server.endpoint, request_timeout_s=2.0, request_tokens=256, hedge_after_s=0, max_inflight_tokens=65536,
                  max_endpoint_inflight_tokens=16384, max_buffered_tokens=131072)   # the trainer's windows
    check, summary = run_stream(cfg, make_samples(160, seed=8, min_len=64, max_len=96), [server])
    assert check.count == 160 and not check.drops
    assert summary["requests"].get("deadline_exceeded", 0) == 0, summary["requests"]
    assert summary["endpoints"][server.endpoint]["samples"] == 160


def test_server_slower_than_the_deadline_is_failed_over(tmp_path):
    # 20 ms per token: every request to the slow server (>= 64 tokens) outlives its 1 s deadline.
    servers = start_servers(tmp_path, [("fast", syn(50)), ("stuck", syn(20000))])
    cfg = targets(",".join(s.endpoint for s in servers), request_timeout_s=1.0, hedge_after_s=0, max_attempts=50)
    check, summary = run_stream(cfg, make_samples(120, seed=6, min_len=64, max_len=96), servers)
    assert check.count == 120 and not check.drops
    assert summary["requests"].get("deadline_exceeded", 0) >= 1, summary["requests"]
    assert summary["retries"].get("deadline_exceeded", 0) >= 1
    assert summary["endpoints"][servers[1].endpoint]["samples"] == 0
