"""What the sglang backend refuses before any engine starts, and tensor parallelism on CPU."""

from __future__ import annotations

import json
import time

import pytest
import torch

from common.errors import ConfigError
from draft_trainer.client.target import TargetClient
from target_server.backends import sglang as sg
from tests.support.procs import run_cli, start_server


def test_installed_version_is_supported():
    from importlib.metadata import version

    assert sg.check_sglang_version() == version("sglang")


@pytest.mark.parametrize("installed", ["0.4.9", "0.6.0", "1.0.0"])
def test_unsupported_version_is_refused_with_what_to_install(monkeypatch, installed):
    # The installed version is faked here: only one real SGLang version can be installed at once.
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: installed)
    with pytest.raises(ConfigError, match=rf"SGLang {installed} is outside the supported range.*sglang=="):
        sg.check_sglang_version()


def test_last_layer_aux_id_is_not_capturable():
    with pytest.raises(ConfigError, match=r"cannot capture layer\(s\) \[3\].*0\.\.2"):
        sg.check_capturable(__import__("pathlib").Path("m"), [0, 1, 3], num_layers=4)
    sg.check_capturable(__import__("pathlib").Path("m"), [0, 1, 2], num_layers=4)


def test_bad_aux_layer_refused_before_engine_start(tiny_llama):
    t0 = time.monotonic()
    res = run_cli("target_server", "serve", "--model", str(tiny_llama), "--backend", "sglang",
                  "--aux-layers", "0,1,3", "--grpc-port", "0", "--flight-port", "0", timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "aux layer 3 is out of range for a 4-layer model" in res.stderr
    assert "ModelRunner" not in res.stderr and "Traceback" not in res.stderr
    assert time.monotonic() - t0 < 60  # refused at config time, not by a crashed engine


def test_tp_needs_sglang_backend(tiny_llama):
    res = run_cli("target_server", "serve", "--model", str(tiny_llama), "--backend", "hf", "--tp", "2",
                  "--grpc-port", "0", "--flight-port", "0", timeout=60)
    assert res.returncode == 2 and "needs --backend sglang" in res.stderr


def test_tp_that_does_not_divide_heads_is_refused(tiny_llama):
    with pytest.raises(ConfigError, match="--tp 3"):
        sg.SGLangBackend(tiny_llama, tp=3)


def test_tensor_parallel_2_matches_hf(tiny_llama, tmp_path, monkeypatch):
    """tp=2: two SGLang ranks (gloo on CPU), vocab-sharded lm_head gathered for the top-k teacher.

    Not bit-exact: each rank multiplies half of every projection and an all-reduce adds the
    halves, a different summation order than one full GEMM (measured max 2.3e-6).
    """
    # SGLang binds each CPU rank's threads to cores; a one-NUMA-node machine must say which.
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0|1")
    hf = start_server(tmp_path, "--model", str(tiny_llama), "--backend", "hf", name="hf")
    srv = start_server(tmp_path, "--model", str(tiny_llama), "--backend", "sglang", "--tp", "2", name="tp2",
                       timeout=400)
    try:
        a, b = TargetClient(hf.endpoint, timeout_s=120), TargetClient(srv.endpoint, timeout_s=120)
        seqs = [[5, 17, 42, 99, 3, 250, 7, 8, 300, 11], list(range(3, 200))]
        A = {f.sample_id: f for f in a.features([0, 1], seqs)}
        B = {f.sample_id: f for f in b.features([0, 1], seqs)}
        for i, s in enumerate(seqs):
            assert B[i].aux_T3H.shape[0] == len(s)
            torch.testing.assert_close(B[i].aux_T3H, A[i].aux_T3H, rtol=0, atol=1e-5)
            torch.testing.assert_close(B[i].teacher_TH, A[i].teacher_TH, rtol=0, atol=1e-5)
        (ta,), (tb,) = list(a.features([0], seqs[:1], teacher="topk", topk=8)), list(b.features([0], seqs[:1], teacher="topk", topk=8))
        assert torch.equal(ta.topk_ids_TK, tb.topk_ids_TK)
        torch.testing.assert_close(tb.topk_logprobs_TK, ta.topk_logprobs_TK, rtol=0, atol=1e-4)
        # Ragged prompts decode together: every rank runs the same joins and steps on its own batch.
        prompts = [("p", [5, 17, 42]), ("q", list(range(3, 30)))]
        assert a.generate(prompts, max_new_tokens=8) == b.generate(prompts, max_new_tokens=8)
        assert json.loads(b.model_info().hf_config_json)["num_hidden_layers"] == 4
        from tests.support.procs import listening_addresses

        addrs = listening_addresses(srv.proc.pid)  # both ranks: rendezvous through a file, not TCP
        assert all(a in ("127.0.0.1", "::ffff:127.0.0.1") for a in addrs), addrs
        a.close()
        b.close()
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
        hf.stop()


def test_max_topk_is_honoured(tiny_llama, tmp_path):
    """--max-topk reaches the sglang backend through the registry (it used to be ignored: always 64).
    In a server process: SGLang's parallel runtime can be built once per process, and the export
    tests build one in this pytest process."""
    srv = start_server(tmp_path, "--model", str(tiny_llama), "--backend", "sglang", "--max-topk", "8",
                       "--max-batch-tokens", "512", name="topk", timeout=300)
    try:
        client = TargetClient(srv.endpoint, timeout_s=60)
        assert client.model_info().max_topk == 8
        client.close()
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
