"""Which server the dispatcher sends the next request to (pure decision logic on real pool objects),
and the pool's configuration and endpoint-spec errors."""

import time

import pytest

from common.config import load_config
from common.contract import ModelInfo
from common.errors import ConfigError, TargetUnavailableError
from draft_trainer.client.discovery import EndpointSource
from draft_trainer.client.dispatcher import Dispatcher, _Request
from draft_trainer.client.pool import UP, Endpoint, TargetPool
from draft_trainer.config import TargetsConfig, TrainConfig


def dispatcher(*eps: Endpoint, **cfg) -> Dispatcher:
    tc = TargetsConfig(endpoints="127.0.0.1:1", hedge_after_s=2.0, **cfg)
    pool = TargetPool(EndpointSource(tc.endpoints), tc)
    pool.info = ModelInfo("LlamaForCausalLM", "llama", 8, 16, 512, [1, 3, 4], "float32", 4096, "fp")
    for e in eps:
        e.state = UP
        pool.endpoints[e.address] = e
    return Dispatcher(pool, iter([]), tc)


def ep(name: str, inflight: int = 0, spt: float | None = None, window: int = 10_000, idle_s: float = 0.0) -> Endpoint:
    return Endpoint(name, window_tokens=window, inflight_tokens=inflight, sec_per_token=spt,
                    idle_since=time.monotonic() - idle_s)


def test_alike_servers_get_least_outstanding_tokens():
    a, b, c = ep("a", 300), ep("b", 100), ep("c", 200)
    d = dispatcher(a, b, c)
    assert d._choose([a, b, c], 64) is b
    a2, b2 = ep("a", 300, spt=1e-3), ep("b", 100, spt=1e-3)
    assert d._choose([a2, b2], 64) is b2


def test_unmeasured_server_is_assumed_as_fast_as_the_best():
    fast, new = ep("fast", 500, spt=1e-4), ep("new", 0, spt=None)
    assert dispatcher(fast, new)._choose([fast, new], 64) is new


def test_full_fast_server_is_waited_for_rather_than_a_much_slower_idle_one():
    fast, slow = ep("fast", 900, spt=1e-4, window=1000), ep("slow", 0, spt=1e-2)
    d = dispatcher(fast, slow)
    assert d._choose([fast, slow], 200) is None          # wait: fast finishes sooner even after its queue
    fast_roomy = ep("fast", 100, spt=1e-4, window=1000)
    assert d._choose([fast_roomy, slow], 200) is fast_roomy


def test_slow_verdict_fades_while_idle():
    fast, slow = ep("fast", 900, spt=1e-4, window=1000), ep("slow", 0, spt=1e-2, idle_s=60)
    assert dispatcher(fast, slow)._choose([fast, slow], 200) is slow


def test_a_server_with_an_overdue_request_is_not_waited_for():
    fast, slow = ep("fast", 900, spt=1e-4, window=1000), ep("slow", 0, spt=1e-2)
    d = dispatcher(fast, slow)
    d._active.add(_Request(fast, [], started=time.monotonic() - 60))  # hung for a minute
    assert d._choose([fast, slow], 200) is slow


def test_pool_config_fields_are_validated():
    with pytest.raises(ConfigError, match="targets.request_tokens must be > 0"):
        load_config(TrainConfig, None, ["data.path=x", "targets.endpoints=h:1", "targets.request_tokens=0"])
    with pytest.raises(ConfigError, match="targets.unavailable_timeout_s must be > 0"):
        load_config(TrainConfig, None, ["data.path=x", "targets.endpoints=h:1", "targets.unavailable_timeout_s=0"])


def test_endpoint_spec_errors_say_what_to_write(tmp_path):
    with pytest.raises(ConfigError, match="dns:NAME:PORT"):
        EndpointSource("dns:no-port")
    with pytest.raises(ConfigError, match="does not exist"):
        EndpointSource(f"file:{tmp_path / 'missing.txt'}")
    with pytest.raises(ConfigError, match="host:port"):
        EndpointSource("localhost:50051,oops")
    listing = tmp_path / "eps"
    listing.write_text("# comment\n127.0.0.1:1, 127.0.0.1:2\n\n127.0.0.1:3  # third\n")
    src = EndpointSource(f"file:{listing}")
    assert src.resolve() == {"127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"}
    listing.write_text("127.0.0.1:1\nnot an endpoint\n")   # a bad rewrite keeps the last good set
    assert src.resolve() == {"127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"}
    listing.write_text("127.0.0.1:4\n")
    assert src.resolve() == {"127.0.0.1:4"}


def test_unresolvable_dns_name_is_retried_until_the_startup_timeout():
    cfg = TargetsConfig(endpoints="dns:no-such-host.invalid:50051", startup_timeout_s=1.0)
    pool = TargetPool(EndpointSource(cfg.endpoints), cfg)
    t0 = time.monotonic()
    with pytest.raises(TargetUnavailableError) as err:
        pool.start()
    assert time.monotonic() - t0 >= 0.5  # waited instead of failing at once
    assert "no-such-host.invalid" in str(err.value) and "startup_timeout_s" in str(err.value)


def test_ipv6_endpoints_keep_their_brackets_on_the_way_to_grpc_and_flight():
    from draft_trainer.client.target import join_host_port, parse_endpoint

    # dns: discovery writes IPv6 addresses as [addr]:port; the channel targets must too.
    for ep, host in (("[::1]:50051", "::1"), ("[fd00::7]:9", "fd00::7"), ("127.0.0.1:50051", "127.0.0.1"),
                     ("target-0.svc:50051", "target-0.svc")):
        h, p = parse_endpoint(ep)
        assert h == host
        assert join_host_port(h, p) == ep
