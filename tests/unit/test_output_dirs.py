"""No command removes a directory it did not write (common/files.py:replace_dir and its users).

Each place that writes an output directory is tried on a directory holding a user's file (the file
must survive) and on `.` (refused, with a message saying why)."""

import json
from pathlib import Path

import pytest

from common.errors import DataError, OutputDirError
from common.files import OUTPUT_MARKER, check_output_dir, replace_dir
from tests.support.procs import run_cli


def user_dir(parent: Path, name: str = "precious") -> Path:
    d = parent / name
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("keep me")
    return d


# ----------------------------------------------------------------------------- the helper

def test_replace_dir_replaces_its_own_output_and_keeps_it_on_failure(tmp_path):
    out = tmp_path / "out"
    with replace_dir(out, "unit test") as tmp:
        (tmp / "a.txt").write_text("1")
    assert (out / OUTPUT_MARKER).read_text().strip() == "unit test"
    with pytest.raises(RuntimeError):
        with replace_dir(out, "unit test") as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert (out / "a.txt").read_text() == "1"          # the failed run left the old output whole
    with replace_dir(out, "unit test") as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == sorted([OUTPUT_MARKER, "b.txt"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]   # no temporary or old copy left behind


def test_replace_dir_refuses_another_commands_output_and_user_files(tmp_path):
    other = tmp_path / "other"
    with replace_dir(other, "export") as tmp:
        (tmp / "x").write_text("x")
    with pytest.raises(OutputDirError, match="is not empty and is not an output of `unit test`"):
        with replace_dir(other, "unit test"):
            pass
    d = user_dir(tmp_path)
    with pytest.raises(OutputDirError, match="refusing to replace what it holds"):
        with replace_dir(d, "unit test"):
            pass
    assert (d / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("where", ["cwd", "parent", "home", "root"])
def test_protected_directories_are_refused_even_with_overwrite(tmp_path, monkeypatch, where):
    work = user_dir(tmp_path, "a/b/work")
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    target = {"cwd": Path("."), "parent": Path(".."), "home": tmp_path / "home", "root": Path("/")}[where]
    if where == "cwd":
        (work / OUTPUT_MARKER).write_text("unit test\n")  # even the command's own earlier output
    reason = {"cwd": "it is the current directory", "parent": "it contains the current directory",
              "home": "it is your home directory", "root": "it is the filesystem root"}[where]
    with pytest.raises(OutputDirError, match=reason):
        check_output_dir(target, "unit test", overwrite=True)
    with pytest.raises(OutputDirError, match=reason):
        with replace_dir(target, "unit test", overwrite=True):
            pytest.fail("a protected directory was about to be replaced")
    assert (work / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- assets

def test_assets_tiny_keeps_a_users_directory_and_refuses_dot(tmp_path):
    d = user_dir(tmp_path)
    res = run_cli("draft_trainer", "assets", "tiny", "--output", str(d), timeout=300)
    assert res.returncode == 2, res.stderr
    assert "is not empty and is not an output of `assets tiny`" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"] and (d / "notes.txt").read_text() == "keep me"

    res = run_cli("draft_trainer", "assets", "tiny", "--output", ".", timeout=300, cwd=d)
    assert res.returncode == 2 and "it is the current directory" in res.stderr, res.stderr
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]


def test_assets_tiny_writes_chats_that_prepare_data_reads(tmp_path):
    out = tmp_path / "tiny"
    res = run_cli("draft_trainer", "assets", "tiny", "--output", str(out), timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(out)  # stdout is the model path alone
    chats = out / "chats.jsonl"
    rows = [json.loads(line) for line in chats.read_text().splitlines()]
    assert len(rows) >= 32 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    again = run_cli("draft_trainer", "assets", "tiny", "--output", str(out), timeout=300)  # its own output: reused
    assert again.returncode == 0 and again.stdout.strip() == str(out), again.stderr
    data = tmp_path / "data"
    res = run_cli("draft_trainer", "prepare-data", "--model", str(out), "--input", str(chats), "--output", str(data),
                  "--workers", "1", "--holdout", "4", timeout=300)
    assert res.returncode == 0, res.stderr
    stats = json.loads((data / "stats.json").read_text())
    assert stats["samples_in"] == len(rows) and stats["heldout"] == 4 and stats["kept"] >= 16
    assert len((data / "heldout_prompts.jsonl").read_text().splitlines()) == 4  # the eval prompts of the README


def test_assets_fetch_refuses_a_users_directory_before_converting(tmp_path, monkeypatch):
    from draft_trainer.assets import fetch

    d = user_dir(tmp_path)
    monkeypatch.setattr(fetch, "_smollm2_gguf", lambda install: pytest.fail("converted into a user's directory"))
    with pytest.raises(OutputDirError, match="not an output of `assets fetch`"):
        fetch.fetch_smollm2(install=False, dest=d)
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------- datasets and caches

def test_prepare_data_refuses_dot_even_when_it_holds_a_dataset(tiny_llama, tiny_dataset, tmp_path, monkeypatch):
    from draft_trainer.data.prepare import PrepareConfig, prepare_data

    d = user_dir(tmp_path)
    for f in tiny_dataset.iterdir():  # `.` looks like a previous dataset: still never replaced
        if f.is_file():
            (d / f.name).write_bytes(f.read_bytes())
    src = tmp_path / "chats.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]}) + "\n")
    monkeypatch.chdir(d)
    with pytest.raises(DataError, match="it is the current directory"):
        prepare_data(PrepareConfig(model=str(tiny_llama), inputs=[str(src)], output=".", workers=1), progress=False)
    assert (d / "notes.txt").read_text() == "keep me"


def test_feature_cache_refuses_a_users_directory(tmp_path):
    from common.contract import ModelInfo
    from common.features import FeatureSchema
    from draft_trainer.data.feature_cache import FeatureCacheWriter

    info = ModelInfo(architecture="LlamaForCausalLM", model_type="llama", num_layers=4, hidden_size=8, vocab_size=64,
                     aux_layer_ids=[0, 1, 2], dtype="bfloat16", max_length=128, tokenizer_fingerprint="fp")
    d = user_dir(tmp_path)
    with pytest.raises(OutputDirError, match="is not a feature cache"):
        FeatureCacheWriter(d, info, FeatureSchema(8, "bfloat16"))
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]
    cache = tmp_path / "cache"
    FeatureCacheWriter(cache, info, FeatureSchema(8, "bfloat16")).close()
    FeatureCacheWriter(cache, info, FeatureSchema(8, "bfloat16")).close()  # its own cache: appended to
    assert (cache / "meta.json").is_file()


def test_feature_cache_refuses_dot(tmp_path, monkeypatch):
    from common.contract import ModelInfo
    from common.features import FeatureSchema
    from draft_trainer.data.feature_cache import FeatureCacheWriter

    info = ModelInfo(architecture="LlamaForCausalLM", model_type="llama", num_layers=4, hidden_size=8, vocab_size=64,
                     aux_layer_ids=[0, 1, 2], dtype="bfloat16", max_length=128, tokenizer_fingerprint="fp")
    monkeypatch.chdir(user_dir(tmp_path))
    with pytest.raises(OutputDirError, match="current directory"):
        FeatureCacheWriter(".", info, FeatureSchema(8, "bfloat16"))
    assert sorted(p.name for p in Path(".").iterdir()) == ["notes.txt"]


def test_the_demo_refuses_a_directory_it_did_not_write(tmp_path):
    from common.errors import OutputDirError
    from draft_trainer.demo import main

    mine = tmp_path / "mine"
    (mine / "train").mkdir(parents=True)
    (mine / "train" / "notes.txt").write_text("my notes")
    with pytest.raises(OutputDirError, match="not empty"):
        main(["--tiny", "--output", str(mine)])
    assert (mine / "train" / "notes.txt").read_text() == "my notes"
