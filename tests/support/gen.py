"""Helpers for tests that drive the scheduler's generation lane directly."""

from __future__ import annotations

import time

from target_server.generation import GenRequest


def collect(req: GenRequest, timeout: float = 300.0) -> dict:
    """{prompt id: completion} once every prompt of `req` is answered (re-raises a failure; the
    timeout only bounds a hang: SGLang on CPU is slow)."""
    outs = {}
    while len(outs) < len(req.prompts):
        item = req.results.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        outs[item[0]] = item[1]
    return outs


def wait_generated(metrics, n: int, timeout: float = 60.0) -> None:
    """Until the server's metrics count `n` generated tokens (or `timeout` passes: the caller's
    assertions then say what is missing)."""
    end = time.monotonic() + timeout
    while metrics.gen_tokens._value.get() < n and time.monotonic() < end:
        time.sleep(0.002)
