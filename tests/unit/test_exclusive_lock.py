"""Processes that fill one cache take turns (common/files.py:exclusive_lock), and a killed holder never
leaves it locked. Real processes: the lock is between processes, not threads."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.procs import REPO, env_with_repo

HOLD = """
import sys, time
from common.files import exclusive_lock
lock, log, hold_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
with exclusive_lock(lock, "a test"):
    with open(log, "a") as f:
        f.write(f"in {time.time()}\\n")
    time.sleep(hold_s)
    with open(log, "a") as f:
        f.write(f"out {time.time()}\\n")
"""


def _spawn(code: str, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], env={**env_with_repo(), **env}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.is_file() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} not written within {timeout_s} s"
        time.sleep(0.05)


def test_two_processes_take_turns(tmp_path):
    lock, log = tmp_path / "x.lock", tmp_path / "log"
    procs = [_spawn(HOLD, str(lock), str(log), "0.8") for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    events = [line.split() for line in log.read_text().splitlines()]
    assert [kind for kind, _ in events] == ["in", "out", "in", "out"], events
    assert float(events[2][1]) >= float(events[1][1])  # the second entered after the first left


def test_a_killed_holder_releases_the_lock(tmp_path):
    lock, log = tmp_path / "x.lock", tmp_path / "log"
    holder = _spawn(HOLD, str(lock), str(log), "120")
    try:
        _wait_for(log)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        nxt = _spawn(HOLD, str(lock), str(tmp_path / "log2"), "0")
        out, err = nxt.communicate(timeout=30)
        assert nxt.returncode == 0, err
        assert (tmp_path / "log2").read_text().count("out") == 1
    finally:
        holder.kill()


def test_asset_fetch_waits_for_another_fetch(tmp_path):
    # A process holding the asset cache's lock (as a fetch that is converting would) makes a second
    # fetch wait until it is done: the second one then finds the first one's result.
    cache = tmp_path / "cache"
    log = tmp_path / "log"
    holder = _spawn(HOLD, str(cache / ".fetch.lock"), str(log), "6")
    try:
        _wait_for(log)
        fetch = _spawn("import time\nfrom common.errors import AssetError\n"
                       "from draft_trainer.assets.fetch import locate_sharegpt\n"
                       "try:\n    locate_sharegpt(install=False)\nexcept AssetError:\n    pass\n"
                       "print(time.time())", SPECRELAY_CACHE=str(cache))
        out, err = fetch.communicate(timeout=120)
        assert fetch.returncode == 0, err
        holder.communicate(timeout=30)
        released = float(log.read_text().split("out ")[1])
        assert float(out.strip().splitlines()[-1]) >= released
    finally:
        holder.kill()
