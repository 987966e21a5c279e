"""The embedded default: a local target server subprocess on 127.0.0.1 for a trainer with no endpoints."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.errors import TargetUnavailableError

log = logging.getLogger(__name__)


class EmbeddedServer:
    """`with EmbeddedServer(model) as endpoint:` runs `target-server serve` on free loopback ports."""

    def __init__(self, model: str, *, backend: str = "hf", dtype: str = "fp32", extra_args: list[str] | None = None,
                 startup_timeout_s: float = 300.0, log_path: str | Path | None = None, threads: int = 0) -> None:
        self.model = model
        self.backend = backend
        self.dtype = dtype
        self.extra_args = extra_args or []
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path else None
        self.threads = threads
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""
        self.ready: dict = {}

    def start(self) -> str:
        tmpdir = Path(tempfile.mkdtemp(prefix="specrelay-embedded-"))
        ready = tmpdir / "ready.json"
        cmd = [sys.executable, "-m", "target_server", "serve", "--model", self.model, "--backend", self.backend,
               "--dtype", self.dtype, "--host", "127.0.0.1", "--grpc-port", "0", "--flight-port", "0",
               "--ready-file", str(ready), *self.extra_args]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = dict(os.environ)
        repo_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = repo_root + os.pathsep + env.get("PYTHONPATH", "")
        if self.threads > 0:  # the server shares the cores with the trainer: split them instead of oversubscribing
            env["OMP_NUM_THREADS"] = str(self.threads)
        log.info("starting embedded target server: %s", " ".join(cmd))
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        end = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < end:
            if ready.is_file():
                self.ready = json.loads(ready.read_text())
                self.endpoint = f"127.0.0.1:{self.ready['grpc_port']}"
                return self.endpoint
            if self.proc.poll() is not None:
                where = f"; see {self.log_path}" if self.log_path else ""
                raise TargetUnavailableError(f"embedded target server exited with status {self.proc.returncode}{where}")
            time.sleep(0.1)
        self.stop()
        raise TargetUnavailableError(f"embedded target server not ready after {self.startup_timeout_s:.0f}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
