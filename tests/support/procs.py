"""Start real SpecRelay processes for tests (bounded waits, loopback only, always cleaned up)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from draft_trainer.client.local_server import LocalServer, start_all

REPO = Path(__file__).resolve().parents[2]


def env_with_repo() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start_server(tmp_path: Path, *args: str, name: str = "server", timeout: float = 120.0) -> LocalServer:
    """`python -m target_server serve <args>` on free loopback ports (the project's one launcher,
    draft_trainer/client/local_server.py); waits for its ready file."""
    return LocalServer(list(args), log_path=tmp_path / f"{name}.log", workdir=tmp_path,
                       startup_timeout_s=timeout).start()


def run_cli(*args: str, timeout: float = 600.0, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m <module> ...` with the repo on the path; returns the completed process."""
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env=env_with_repo(), cwd=cwd or REPO)


def run_code(code: str, timeout: float = 120.0, **env: str) -> subprocess.CompletedProcess:
    """Run `python -c code` in a fresh interpreter with the repo on the path (for checks that need a clean
    process: what gets imported, peak memory), `env` added to its environment; returns the completed process."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**env_with_repo(), **env}, cwd=REPO)


def start_servers(tmp_path: Path, specs: list[tuple[str, list[str]]], timeout: float = 120.0) -> list[LocalServer]:
    """Start several servers at once ([(name, args), ...]); all or none (the started ones are killed on error)."""
    return start_all([LocalServer(list(args), log_path=tmp_path / f"{name}.log", workdir=tmp_path,
                                  startup_timeout_s=timeout) for name, args in specs])


def listening_addresses(pid: int) -> set[str]:
    """Addresses a process and its children listen on (TCP)."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {c.laddr.ip for p in procs for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
