"""The vLLM CPU lane: runs only when asked for (tests/vllm_lane/run.sh), and then never skips.

The main suite does not recurse into this directory (pyproject `norecursedirs`). When the lane
is requested but vLLM, speculators or the in-process engine switch are missing, collection stops
with an error that says how to set the lane up: the lane fails loudly instead of skipping.
"""

from __future__ import annotations

import importlib.util
import os

import pytest


def _lane_problems() -> list[str]:
    problems = [f"{m} is not importable (run tests/vllm_lane/setup.sh and use .venv-vllm)"
                for m in ("vllm", "speculators") if importlib.util.find_spec(m) is None]
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        problems.append("VLLM_ENABLE_V1_MULTIPROCESSING=0 is not set (the tests read the engine in-process)")
    return problems


def pytest_configure(config):
    problems = _lane_problems()
    if problems:
        raise pytest.UsageError("vLLM CPU lane requested but not runnable:\n  - " + "\n  - ".join(problems)
                                + "\nRun it with: bash tests/vllm_lane/run.sh")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "vllm_lane" in str(item.fspath):
            item.add_marker(pytest.mark.vllm)
