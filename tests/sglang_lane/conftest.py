"""The SGLang CPU lane: runs only when asked for (tests/sglang_lane/run.sh), and then never skips.

The main suite does not recurse into this directory (pyproject `norecursedirs`). When the lane
is requested but SGLang, the stand-ins or the CPU engine switch are missing, collection stops
with an error that says how to set the lane up: the lane fails loudly instead of skipping.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

STUBS = Path(__file__).resolve().parent / "stubs"


def _lane_problems() -> list[str]:
    problems = []
    if importlib.util.find_spec("sglang") is None:
        problems.append("sglang is not importable (run tests/sglang_lane/setup.sh and use .venv-sglang)")
    spec = importlib.util.find_spec("sgl_kernel")
    if spec is None or not str(spec.origin or "").startswith(str(STUBS)):
        problems.append(f"the sgl_kernel stand-in is not first on PYTHONPATH ({STUBS})")
    if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        problems.append("SGLANG_USE_CPU_ENGINE=1 is not set")
    return problems


def pytest_configure(config):
    problems = _lane_problems()
    if problems:
        raise pytest.UsageError(
            "SGLang CPU lane requested but not runnable:\n  - " + "\n  - ".join(problems)
            + "\nRun it with: bash tests/sglang_lane/run.sh"
        )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "sglang_lane" in str(item.fspath):
            item.add_marker(pytest.mark.sglang)


@pytest.fixture(scope="session")
def inprocess_sglang_target(tiny_llama):
    """One in-process SGLang target runner on the tiny Llama, shared by every test module that
    needs SGLang's parallel/runtime context in this process: SGLang builds that context once per
    process, so a second backend in the same process fails ("init_parallel_runtime() ran twice")."""
    from target_server.backends.sglang import SGLangBackend

    backend = SGLangBackend(tiny_llama, dtype="fp32")
    yield backend
    backend.close()
