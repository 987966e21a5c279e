"""docs/quickstart.md, operations.md, troubleshooting.md: the files they name exist and the
commands they show parse with the real CLIs (so the docs cannot drift from the code silently)."""

from __future__ import annotations

import re
import shlex

import pytest

from common.config import parse_overrides
from deploy.ray.launch import build_parser as launch_parser
from draft_trainer.config import TrainConfig
from target_server.cli import build_parser as server_parser
from tests.deploy.conftest import REPO

DOCS = [REPO / "docs" / n for n in ("quickstart.md", "operations.md", "troubleshooting.md")]


def commands(path) -> list[list[str]]:
    """Shell commands in the file's ``` blocks (continuations joined, comments dropped)."""
    out = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", path.read_text(), re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split(" #")[0].strip()
            if cmd and not cmd.startswith("#"):
                out.append(shlex.split(cmd))
    return out


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_named_repository_files_exist(path):
    named = set(re.findall(r"`((?:deploy|docs|tests|common|target_server|draft_trainer)/[\w./-]+)`", path.read_text()))
    assert named, f"{path.name} names no repository file"
    missing = sorted(n for n in named if not (REPO / n.rstrip("/")).exists())
    assert not missing, f"{path.name} names files that do not exist: {missing}"


def test_quickstart_commands_parse_with_the_real_clis():
    seen = set()
    for argv in commands(REPO / "docs" / "quickstart.md"):
        argv = [a for a in argv if "=" not in a or not re.fullmatch(r"[A-Z_]+=.*", a)]  # drop VAR=value prefixes
        if argv[:3] == ["python", "-m", "deploy.ray.launch"]:
            args = launch_parser().parse_args(argv[3:])
            server_parser().parse_args(["serve", *shlex.split(args.server_args)])
            parse_overrides(args.overrides, TrainConfig)
            seen.add("ray")
        elif argv[:2] == ["target-server", "serve"]:
            server_parser().parse_args(argv[1:])
            seen.add("server")
        elif argv[:2] == ["draft-trainer", "train"]:
            parse_overrides([a for a in argv[2:] if "=" in a], TrainConfig)
            seen.add("trainer")
    assert seen == {"ray", "server", "trainer"}
