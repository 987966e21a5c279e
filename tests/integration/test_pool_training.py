"""The trainer on the pool, end to end over real synthetic servers (fp32, CPU):

- the per-step losses do not depend on how many servers answered or on a server dying mid-run;
- all servers gone -> a clear error and a checkpoint whose cursor resumes the run exactly once;
- mismatched servers -> the CLI fails before any training, naming both values.
"""

import json
import signal
import threading
import time
import urllib.request

import pytest

from common.config import load_config
from common.errors import TargetUnavailableError
from draft_trainer.assets.tiny import build_synthetic_dataset
from draft_trainer.config import TrainConfig
from draft_trainer.train.loop import Trainer
from tests.support.pool import syn
from tests.support.procs import run_cli, start_servers

COST_US = 1500  # slow enough that killing a server lands mid-run with work in flight


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", 48, min_len=24, max_len=64)


def config(dataset, out, endpoints: str, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"targets.endpoints={endpoints}", f"data.path={dataset}", f"output_dir={out}", "max_steps=20",
        "batch_size=2", "epochs=2", "model.ttt_steps=2", "optim.lr=3e-3", "log_every=100",
        "targets.request_tokens=128", "targets.max_endpoint_inflight_tokens=256", "targets.max_buffered_tokens=512",
        "targets.refresh_interval_s=0.3", "targets.probe_max_backoff_s=0.5", "targets.hedge_after_s=0",
        *extra])


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_in_thread(cfg: TrainConfig) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run():
        try:
            box["trainer"] = Trainer(cfg)
            box["summary"] = box["trainer"].run()
        except BaseException as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def kill_after_steps(out, steps: int, servers, thread, timeout: float = 60.0) -> int:
    """SIGKILL `servers` once metrics.jsonl has `steps` records; returns the records seen at the kill."""
    end = time.monotonic() + timeout
    f = out / "metrics.jsonl"
    while time.monotonic() < end and thread.is_alive():
        n = len(f.read_text().splitlines()) if f.exists() else 0
        if n >= steps:
            for s in servers:
                s.stop(signal.SIGKILL)
            return n
        time.sleep(0.01)
    raise AssertionError("the run ended before the kill point; make it slower")


def test_losses_identical_with_one_server_or_three_with_one_killed(dataset, tmp_path):
    ref, *trio = start_servers(tmp_path, [(f"s{i}", syn(COST_US)) for i in range(4)])
    try:
        a = Trainer(config(dataset, tmp_path / "one", ref.endpoint)).run()
        t, box = train_in_thread(config(dataset, tmp_path / "three", ",".join(s.endpoint for s in trio),
                                        "metrics_port=0"))
        killed_at = kill_after_steps(tmp_path / "three", 5, [trio[1]], t)
        t.join(timeout=120)
        assert "error" not in box, box.get("error")
        b = box["summary"]
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{box['trainer'].metrics_port}/metrics", timeout=10).read()
    finally:
        for s in [ref, *trio]:
            s.stop(signal.SIGKILL)
    ra, rb = records(tmp_path / "one"), records(tmp_path / "three")
    assert a["steps"] == b["steps"] == 20 and killed_at < 20
    assert [r["sample_ids"] for r in ra] == [r["sample_ids"] for r in rb]
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]           # bit-identical fp32 trajectory
    assert [r["step_loss"] for r in ra] == [r["step_loss"] for r in rb]
    pool = b["pool"]
    assert pool["endpoints"][trio[1].endpoint]["state"] == "down"
    assert pool["reissued"] >= 1, pool  # the killed server had work in flight; others answered it
    assert b["samples_consumed"] == a["samples_consumed"] == 40
    assert pool["pulled"] == pool["delivered"] + sum(pool["dropped"].values()) + pool["unconsumed"]
    text = scrape.decode()
    assert "specrelay_trainer_samples_consumed_total 40.0" in text
    assert f'specrelay_trainer_samples_dispatched_total {float(pool["dispatched"])}' in text
    assert 'specrelay_trainer_endpoints{state="down"} 1.0' in text
    assert "specrelay_trainer_failovers_total 1.0" in text and "specrelay_trainer_data_wait_seconds_total" in text


def test_all_servers_gone_stops_with_a_checkpoint_and_resume_is_exactly_once(dataset, tmp_path):
    ref, doomed = start_servers(tmp_path, [("ref", syn(COST_US)), ("doomed", syn(COST_US))])
    try:
        Trainer(config(dataset, tmp_path / "straight", ref.endpoint)).run()
        out = tmp_path / "broken"
        t, box = train_in_thread(config(dataset, out, doomed.endpoint, "targets.unavailable_timeout_s=1.5"))
        kill_after_steps(out, 6, [doomed], t)
        t.join(timeout=60)
        assert not t.is_alive(), "the run hung after losing every server"
        err = box.get("error")
        assert isinstance(err, TargetUnavailableError), box
        state = json.loads((out / "checkpoints" / "latest" / "trainer.json").read_text())
        stopped_at = state["step"]
        assert f"Training stopped at step {stopped_at}" in str(err) and "resume_from=" in str(err)
        assert doomed.endpoint in str(err)
        assert len(records(out)) == stopped_at and 6 <= stopped_at < 20
        summary = json.loads((out / "summary.json").read_text())
        assert summary["stopped"] and summary["steps"] == stopped_at
        assert summary["cursors"] == [state["ranks"]["0"]["cursor"]]

        # Resume against another server: exactly the samples past the cursor, same trajectory.
        Trainer(config(dataset, out, ref.endpoint, "resume_from=auto")).run()
    finally:
        ref.stop(signal.SIGKILL)
        doomed.stop(signal.SIGKILL)
    straight, resumed = records(tmp_path / "straight"), records(out)
    assert [r["step"] for r in resumed] == list(range(1, 21))
    assert [r["sample_ids"] for r in resumed] == [r["sample_ids"] for r in straight]  # nothing lost or repeated
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


def test_cli_refuses_mismatched_servers_before_training(dataset, tmp_path):
    servers = start_servers(tmp_path, [("v512", syn(0)), ("v1024", syn(0, "--synthetic-vocab-size", "1024"))])
    out = tmp_path / "run"
    try:
        res = run_cli("draft_trainer", "train", f"targets.endpoints={','.join(s.endpoint for s in servers)}",
                      f"data.path={dataset}", f"output_dir={out}", "max_steps=2", timeout=300)
    finally:
        for s in servers:
            s.stop(signal.SIGKILL)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "'synthetic-v512'" in res.stderr and "'synthetic-v1024'" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (out / "metrics.jsonl").exists()
