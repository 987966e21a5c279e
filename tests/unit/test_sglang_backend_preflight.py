"""The sglang backend's pre-flight checks run without SGLang installed (the main suite has none)."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import ConfigError
from target_server.backends import sglang as sg
from tests.support.procs import REPO, env_with_repo


def _installed(version):
    def fake(name):
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version
    return fake


def test_missing_sglang_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", _installed(None))
    with pytest.raises(ConfigError, match=r"SGLang is not installed.*sglang>=0\.5\.23,<0\.6\.0.*--backend hf"):
        sg.check_sglang_version()


@pytest.mark.parametrize("v,ok", [("0.5.23", True), ("0.5.30.post1", True), ("0.5.22", False), ("0.6.0", False)])
def test_supported_range(monkeypatch, v, ok):
    monkeypatch.setattr(importlib.metadata, "version", _installed(v))
    if ok:
        assert sg.check_sglang_version() == v
    else:
        with pytest.raises(ConfigError, match="outside the supported range"):
            sg.check_sglang_version()


def test_last_layer_is_not_capturable():
    with pytest.raises(ConfigError, match=r"cannot capture layer\(s\) \[31\]"):
        sg.check_capturable(Path("m"), [1, 15, 31], num_layers=32)
    sg.check_capturable(Path("m"), [1, 15, 28], num_layers=32)


def test_importing_the_backend_module_does_not_import_sglang():
    code = "import sys, target_server.backends.sglang\nassert 'sglang' not in sys.modules\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_with_repo(), cwd=REPO)
    assert res.returncode == 0, res.stderr
