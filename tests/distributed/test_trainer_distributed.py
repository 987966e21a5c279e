"""The distributed trainer end to end, against real synthetic target servers on 127.0.0.1:
2 gloo ranks (FSDP2) vs 1 rank, kill -9 + resume bit-exact, SIGTERM checkpoint, offline cache.

The synthetic backend computes features independent of how a server batches samples, so runs
are deterministic across world sizes and restarts (the HF backend differs by ~1e-6 between a
padded batch and single sequences; see tests/integration/test_target_server_hf.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.memory import find_jemalloc
from draft_trainer.assets.tiny import build_synthetic_dataset
from draft_trainer.export import export_sglang, load_trained_draft
from tests.support.procs import REPO, env_with_repo, start_server

SYN = ["--backend", "synthetic", "--synthetic-hidden-size", "32", "--dtype", "fp32"]
COMMON = ["batch_size=4", "model.ttt_steps=3", "model.precision=fp32", "progress=false", "data.draft_vocab_size=256",
          "optim.lr=1e-3", "optim.warmup_ratio=0.2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_synthetic_dataset(tmp_path_factory.mktemp("data") / "ds", 64)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("srv"), *SYN, "--synthetic-cost-per-token-us", "300")
    yield srv
    srv.stop()


def train_cmd(*args: str, nproc: int = 0) -> list[str]:
    cmd = [sys.executable, "-m", "draft_trainer", "train"]
    if nproc:
        cmd += ["--nproc", str(nproc)]
    return cmd + list(args)


def run(*args: str, nproc: int = 0, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    res = subprocess.run(train_cmd(*args, nproc=nproc), capture_output=True, text=True, timeout=timeout,
                         env={**env_with_repo(), **env}, cwd=REPO)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def records(out: Path, split: str = "train") -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split", "train") == split]


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        f = out / "metrics.jsonl"
        if f.is_file() and len(records(out)) >= step:
            return
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else "trainer exited early"
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_two_ranks_match_one_rank(dataset, server, tmp_path):
    base = [f"targets.endpoints={server.endpoint}", f"data.path={dataset}", "max_steps=6", *COMMON]
    run(*base, f"output_dir={tmp_path / 'one'}", SPECRELAY_MALLOC="glibc")
    run(*base, f"output_dir={tmp_path / 'two'}", nproc=2)     # on jemalloc where the system has it (the ranks too)
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert sorted(a["sample_ids"]) == sorted(b["sample_ids"])   # the same global batch every step
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["loss"], b["loss"])
        for x, y in zip(a["acc"], b["acc"]):
            assert abs(x - y) < 1e-9                                   # metrics merged over ranks exactly
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["samples_consumed"] == 24
    assert len(summary["cursors"]) == 2
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["allocator"] == ["glibc"]
    assert summary["allocator"] == ["jemalloc" if find_jemalloc() else "glibc"] * 2   # the allocator changes no loss
    # The sharded (2-rank) checkpoint loads into one process and exports.
    ckpt = tmp_path / "two" / "checkpoints" / "latest"
    assert sorted(p.name for p in ckpt.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    assert load_trained_draft(ckpt).cfg.target_hidden_size == 32
    export_sglang(ckpt, tmp_path / "export")
    assert (tmp_path / "two" / "loss.png").is_file() and (tmp_path / "two" / "accuracy.png").is_file()


def test_kill9_then_resume_is_bit_exact(dataset, server, tmp_path):
    base = [f"targets.endpoints={server.endpoint}", f"data.path={dataset}", "max_steps=12", "save_every=3", *COMMON]
    run(*base, f"output_dir={tmp_path / 'straight'}")
    out = tmp_path / "crashed"
    proc = subprocess.Popen(train_cmd(*base, f"output_dir={out}"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env_with_repo(), cwd=REPO)
    try:
        wait_for_step(out, 7, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # A save interrupted mid-way leaves a temporary directory: resume must ignore it.
    (out / "checkpoints" / ".tmp-step_00000099").mkdir()
    resumed_from = int(json.loads((out / "checkpoints" / "latest" / "trainer.json").read_text())["step"])
    assert resumed_from in (6, 9)                                    # the last complete periodic checkpoint
    run(*base, f"output_dir={out}", "resume_from=auto")
    straight = records(tmp_path / "straight")
    after = records(out)[-(12 - resumed_from):]
    assert [r["step"] for r in after] == list(range(resumed_from + 1, 13))
    for a, b in zip(after, straight[resumed_from:]):
        assert a["sample_ids"] == b["sample_ids"]
        assert a["loss"] == b["loss"]                                # bit-identical (fp32, CPU)
        assert a["acc"] == b["acc"]
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert len(kept) <= 3 and kept[-1] == "step_00000012"           # keep_last


def test_sigterm_saves_a_checkpoint_and_resume_finishes(dataset, server, tmp_path):
    base = [f"targets.endpoints={server.endpoint}", f"data.path={dataset}", "max_steps=10", *COMMON]
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(*base, f"output_dir={out}"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env_with_repo(), cwd=REPO)
    try:
        wait_for_step(out, 3, proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "signal" and 3 <= summary["steps"] < 10
    state = json.loads((out / "checkpoints" / "latest" / "trainer.json").read_text())
    assert state["step"] == summary["steps"]
    run(*base, f"output_dir={out}", "resume_from=auto")
    recs = records(out)
    assert [r["step"] for r in recs] == list(range(1, 11))          # nothing lost, nothing repeated
    ids = [i for r in recs for i in r["sample_ids"]]
    assert len(ids) == len(set(ids)) == 40


def test_two_ranks_share_one_run_clock(dataset, server, tmp_path):
    """Time budget, time-laid learning rate and timed checkpoints on 2 ranks: every rank decides
    from the same (all-reduced) run clock, so both stop at the same step and save the same
    checkpoints; a rank deciding alone would leave the other waiting in a collective (timeout)."""
    out = tmp_path / "run"
    base = [f"targets.endpoints={server.endpoint}", f"data.path={dataset}", "max_steps=100000", "epochs=1000",
            *COMMON, "time_budget_s=4", "optim.schedule=time", "save_every_s=1", f"output_dir={out}"]
    run(*base, nproc=2, timeout=120)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "time_budget" and summary["wall_s"] >= 4.0
    kept = sorted((out / "checkpoints").glob("step_*"))
    assert len(kept) == 3 and kept[-1].name == f"step_{summary['steps']:08d}"
    for ckpt in kept:
        assert sorted(p.name for p in ckpt.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    lrs = [r["lr"] for r in records(out)]
    assert max(lrs) > lrs[-1] > 0                                    # warmed up, then decayed over the 4 s
    # the whole budget spent: resumed on 2 ranks, both stop before training a step
    run(*base, "resume_from=auto", nproc=2, timeout=120)
    again = json.loads((out / "summary.json").read_text())
    assert again["stopped"] == "time_budget" and again["steps"] == summary["steps"]


def test_feature_cache_then_offline_without_any_server(dataset, tmp_path):
    srv = start_server(tmp_path, *SYN, name="cache-srv")
    cache = tmp_path / "cache"
    base = [f"data.path={dataset}", "max_steps=8", *COMMON, f"feature_cache.dir={cache}"]
    try:
        run(*base, f"targets.endpoints={srv.endpoint}", f"output_dir={tmp_path / 'online'}")
    finally:
        srv.stop()
    summary = json.loads((tmp_path / "online" / "summary.json").read_text())
    assert summary["features_cached"] == 32
    assert (cache / "meta.json").is_file() and (cache / "frozen.safetensors").is_file()
    # No server is running now: the offline run trains from the cache alone, on the same trajectory.
    run(*base, "feature_cache.offline=true", f"output_dir={tmp_path / 'offline'}")
    online, offline = records(tmp_path / "online"), records(tmp_path / "offline")
    # Same features, same trajectory: equal to float32 rounding. Not bit for bit: about 1 run in 4 the
    # second step's loss differed in its last bit (13.931548 vs 13.931549; on session 6's code too; not
    # diagnosed, a guess: online features arrive in Arrow buffers of varying alignment, cached ones from
    # a memory map). A wrong or misordered cached sample moves the losses by far more than 1e-6.
    assert [r["loss"] for r in offline] == pytest.approx([r["loss"] for r in online], rel=1e-6, abs=0)
    assert [r["sample_ids"] for r in offline] == [r["sample_ids"] for r in online]
    # Beyond what was cached, samples are dropped with a reason, never silently.
    run(*base, "feature_cache.offline=true", "max_steps=12", f"output_dir={tmp_path / 'beyond'}")
    s = json.loads((tmp_path / "beyond" / "summary.json").read_text())
    assert s["samples_dropped"].get("not_in_cache", 0) > 0 and s["steps"] == 8


def test_heldout_eval_best_checkpoint_metrics_and_dry_run(dataset, server, tmp_path):
    import urllib.request

    from common.config import load_config
    from draft_trainer.config import TrainConfig
    from draft_trainer.data.dataset import TokenizedDataset
    from draft_trainer.train.loop import Trainer

    out = tmp_path / "run"
    cfg = load_config(TrainConfig, None, [f"targets.endpoints={server.endpoint}", f"data.path={dataset}",
                                          f"output_dir={out}", "max_steps=8", *COMMON, "optim.lr=3e-3",
                                          "eval.holdout=8", "eval.every_steps=4", "metrics_port=0"])
    tr = Trainer(cfg)
    summary = tr.run()
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [4, 8] and all(r["positions"][0] > 0 for r in evals)
    assert summary["samples_heldout"] == 8 and summary["samples_consumed"] == 32
    ds = TokenizedDataset(dataset)
    heldout = {ds[int(i)][0] for i in tr.eval_indices}
    trained = {i for r in records(out) for i in r["sample_ids"]}
    assert len(heldout) == 8 and len(trained) == 32 and not heldout & trained
    best = out / "checkpoints" / "best"
    assert best.is_symlink() and (best / "COMPLETE").is_file()
    assert json.loads((best / "trainer.json").read_text())["best"] == max(r["sim_accept_len"] for r in evals)
    text = urllib.request.urlopen(f"http://127.0.0.1:{tr.metrics_port}/metrics", timeout=10).read().decode()
    assert "specrelay_trainer_steps_total 8.0" in text
    assert 'specrelay_trainer_accuracy{position="0"}' in text and "specrelay_trainer_tokens_total" in text

    res = subprocess.run(train_cmd("--dry-run", f"targets.endpoints={server.endpoint}", f"data.path={dataset}",
                                   "batch_size=8", nproc=2), capture_output=True, text=True, timeout=120,
                         env=env_with_repo(), cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "world_size                         2" in res.stdout and "target hidden size" in res.stdout
    assert "32 (server" in res.stdout and "feature bandwidth per step" in res.stdout


def test_bad_resume_and_config_errors_are_clear(dataset, tmp_path):
    res = subprocess.run(train_cmd(f"data.path={dataset}", "targets.endpoints=127.0.0.1:1", "resume_from=/nope"),
                         capture_output=True, text=True, timeout=120, env=env_with_repo(), cwd=REPO)
    assert res.returncode == 2 and "not a complete checkpoint" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run(train_cmd(f"data.path={dataset}", "feature_cache.offline=true"),
                         capture_output=True, text=True, timeout=120, env=env_with_repo(), cwd=REPO)
    assert res.returncode == 2 and "feature_cache.dir" in res.stderr
    assert os.path.exists(dataset)


def test_two_ranks_replay_their_own_cache(dataset, server, tmp_path):
    """feature_cache.replay with 2 ranks: each writes its own shards, reads its samples back in the
    second epoch, and the run trains exactly like one that asks the server every epoch."""
    base = [f"data.path={dataset}", "epochs=2", "max_steps=1000", *COMMON, f"targets.endpoints={server.endpoint}"]
    run(*base, f"output_dir={tmp_path / 'online'}", nproc=2)
    run(*base, f"feature_cache.dir={tmp_path / 'cache'}", "feature_cache.replay=true",
        f"output_dir={tmp_path / 'replay'}", nproc=2)
    online, replay = records(tmp_path / "online"), records(tmp_path / "replay")
    assert len(online) == 2 * 64 // 4 and [r["loss"] for r in replay] == [r["loss"] for r in online]
    src = json.loads((tmp_path / "replay" / "summary.json").read_text())["pool"]   # rank 0's stream
    assert src["requested"] == 32 and src["replayed"] == 32
    shards = [p.name for p in (tmp_path / "cache").glob("shard-*.arrow")]
    assert any(n.startswith("shard-r0-") for n in shards) and any(n.startswith("shard-r1-") for n in shards)
