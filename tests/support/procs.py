"""Start real SpecRelay processes for tests (bounded waits, loopback only, always cleaned up)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def env_with_repo() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@dataclass
class ServerProc:
    proc: subprocess.Popen
    grpc_port: int
    flight_port: int
    metrics_port: int | None
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def start_server(tmp_path: Path, *args: str, name: str = "server", timeout: float = 120.0) -> ServerProc:
    """`python -m target_server serve <args>` on free loopback ports; waits for its ready file."""
    ready = tmp_path / f"{name}.ready.json"
    log_path = tmp_path / f"{name}.log"
    cmd = [sys.executable, "-m", "target_server", "serve", "--host", "127.0.0.1", "--grpc-port", "0",
           "--flight-port", "0", "--ready-file", str(ready), *args]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env_with_repo(), cwd=REPO)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready.is_file():
            info = json.loads(ready.read_text())
            return ServerProc(proc, info["grpc_port"], info["flight_port"], info.get("metrics_port"), log_path)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server not ready after {timeout}s:\n{log_path.read_text()}")


def run_cli(*args: str, timeout: float = 600.0, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m <module> ...` with the repo on the path; returns the completed process."""
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env=env_with_repo(), cwd=cwd or REPO)


def start_servers(tmp_path: Path, specs: list[tuple[str, list[str]]], timeout: float = 120.0) -> list[ServerProc]:
    """Start several servers at once ([(name, args), ...]); all or none (the started ones are killed on error)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(len(specs)) as ex:
        futs = [ex.submit(start_server, tmp_path, *args, name=name, timeout=timeout) for name, args in specs]
        concurrent.futures.wait(futs)
    started = [f.result() for f in futs if f.exception() is None]
    errors = [f.exception() for f in futs if f.exception() is not None]
    if errors:
        for s in started:
            s.stop(signal.SIGKILL)
        raise errors[0]
    return [f.result() for f in futs]
