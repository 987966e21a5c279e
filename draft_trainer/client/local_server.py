"""One launcher for a local target server subprocess (`python -m target_server serve` on free
loopback ports), used by the trainer's embedded default, the tests and the benchmarks.

    with LocalServer(["--model", DIR, "--backend", "hf"]) as srv:
        srv.endpoint   # "127.0.0.1:<grpc port>"

It waits (bounded) for the server's ready file, which carries the ports it bound; a server that
exits or never gets ready is an error that points at its log. `start_all` starts several at once
(all or none). `stop` sends SIGTERM (the server drains) and kills it after a timeout. The server
gets this process's pid (`--parent-pid`) and exits if this process dies without stopping it
(kill -9): no orphan keeps its ports and memory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.errors import TargetUnavailableError

REPO = Path(__file__).resolve().parents[2]


class LocalServer:
    def __init__(self, args: list[str], *, log_path: str | Path | None = None, threads: int = 0,
                 startup_timeout_s: float = 300.0, workdir: str | Path | None = None) -> None:
        self.args = list(args)
        self.dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="specrelay-server-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = Path(log_path) if log_path else self.dir / "server.log"
        self.threads = threads
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.ready: dict = {}
        self._ready_file: Path | None = None  # set by launch()
        self._deadline = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "LocalServer":
        self.launch()
        return self.wait_ready()

    def launch(self) -> None:
        """Start the process without waiting for it (start_all launches several, then waits)."""
        self._ready_file = self.dir / f"ready-{os.getpid()}-{id(self)}.json"
        cmd = [sys.executable, "-m", "target_server", "serve", "--host", "127.0.0.1", "--grpc-port", "0",
               "--flight-port", "0", "--ready-file", str(self._ready_file), "--parent-pid", str(os.getpid()),
               *self.args]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        if self.threads > 0:  # the server shares the cores with the trainer: split them instead of oversubscribing
            env["OMP_NUM_THREADS"] = str(self.threads)
        with open(self.log_path, "ab") as out:
            # The caller's working directory: relative model paths mean what the user typed.
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self._deadline = time.monotonic() + self.startup_timeout_s

    def wait_ready(self) -> "LocalServer":
        """Wait (bounded by startup_timeout_s from the launch) for the ready file with the bound ports."""
        if self.proc is None or self._ready_file is None:
            raise RuntimeError("LocalServer.wait_ready() before launch()")
        while time.monotonic() < self._deadline:
            if self._ready_file.is_file():
                self.ready = json.loads(self._ready_file.read_text())
                return self
            if self.proc.poll() is not None:
                raise TargetUnavailableError(f"local target server exited with status {self.proc.returncode}; "
                                             f"its log ({self.log_path}):\n{self.log()[-3000:]}")
            time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise TargetUnavailableError(f"local target server not ready after {self.startup_timeout_s:.0f}s; "
                                     f"its log ({self.log_path}):\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ what it bound
    @property
    def grpc_port(self) -> int:
        return int(self.ready["grpc_port"])

    @property
    def flight_port(self) -> int:
        return int(self.ready["flight_port"])

    @property
    def metrics_port(self) -> int | None:
        return self.ready.get("metrics_port")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_all(servers: list[LocalServer]) -> list[LocalServer]:
    """Start several servers side by side (each loads its model while the others do): all or none,
    a failure of one stops the others."""
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.stop(signal.SIGKILL)
        raise
    return servers
