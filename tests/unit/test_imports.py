"""The core must not import heavy optional parts (sglang, ray) at start-up."""

import subprocess
import sys

from tests.support.procs import REPO, env_with_repo


def test_core_does_not_import_sglang_or_ray():
    code = (
        "import sys, common.features, common.contract, target_server.cli, target_server.server, "
        "draft_trainer.cli, draft_trainer.train.loop\n"
        "bad = [m for m in ('sglang', 'ray', 'triton') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_with_repo(), cwd=REPO)
    assert res.returncode == 0, res.stderr
