"""Tensor-parallel ranks 1..tp-1: worker processes that run every program rank 0 broadcasts (SPMD)."""

from __future__ import annotations

import logging
import os

from target_server.backends.sglang.runner import _Program, _Runner

log = logging.getLogger(__name__)


def _worker_main(spec: dict, tp_rank: int, ready) -> None:
    """TP rank > 0: build the same runner, then run every program rank 0 broadcasts."""
    runner = None
    try:
        runner = _Runner(spec, tp_rank)
        ready.put(("ok", tp_rank))
    except BaseException as e:  # tell rank 0 instead of hanging it
        ready.put(("error", f"tp rank {tp_rank}: {type(e).__name__}: {e}"))
        raise
    while True:
        prog = _broadcast(None)
        if prog.op == "stop":
            return
        try:
            runner.run(prog)
        except Exception:
            log.exception("tp rank %d: program %s failed", tp_rank, prog.op)


def _broadcast(prog: _Program | None) -> _Program:
    import torch.distributed as dist
    from sglang.srt.distributed import get_tp_group

    box = [prog]
    dist.broadcast_object_list(box, src=get_tp_group().ranks[0], group=get_tp_group().cpu_group)
    return box[0]


class TPWorkers:
    """Ranks 1..tp-1 as spawned processes; rank 0 is the caller's own runner."""

    def __init__(self, spec: dict, tp: int) -> None:
        self.spec, self.tp = spec, tp
        self._procs = []
        self._ready = None

    def start(self) -> None:
        if self.tp == 1:
            return
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._ready = ctx.Queue()
        for rank in range(1, self.tp):
            p = ctx.Process(target=_worker_main, args=(self.spec, rank, self._ready), daemon=True,
                            name=f"sglang-tp{rank}")
            p.start()
            self._procs.append(p)

    def wait_ready(self, timeout: float = 600.0) -> str | None:
        """None once every worker is up, else the first failure's message."""
        for _ in self._procs:
            status, msg = self._ready.get(timeout=timeout)
            if status != "ok":
                return msg
        return None

    def send(self, prog: _Program) -> None:
        if self.tp > 1:
            _broadcast(prog)

    def stop(self) -> None:
        if self.tp > 1 and self._procs:
            try:
                _broadcast(_Program("stop"))
            except Exception:
                pass
            for p in self._procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
            self._procs = []


def _rendezvous_file() -> str:
    import tempfile
    import uuid

    return os.path.join(tempfile.gettempdir(), f"specrelay-sglang-{os.getpid()}-{uuid.uuid4().hex[:8]}.store")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
