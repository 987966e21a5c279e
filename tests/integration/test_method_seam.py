"""The draft-method seam: a second method, one folder outside the package
(tests/support/toy_method), chosen by `model.method=<import path>`, goes through the same
commands as EAGLE-3: train (online, with a checkpoint), resume, export, eval (lossless)."""

from __future__ import annotations

import json

import pytest

from draft_trainer.config import TrainConfig
from tests.support.procs import run_cli, start_server
from tests.support.toy_method import IMPORT_PATH


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("seam"), "--model", str(tiny_llama), "--backend", "hf",
                       "--dtype", "fp32")
    yield srv
    srv.stop()


def _train(server, dataset, out, *extra):
    res = run_cli("draft_trainer", "train", f"model.method={IMPORT_PATH}", f"targets.endpoints={server.endpoint}",
                  f"data.path={dataset}", f"output_dir={out}", "batch_size=4", "optim.lr=1e-2", "progress=false",
                  "optim.warmup_ratio=0", "data.draft_vocab_size=256", "eval.holdout=4", *extra, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def _losses(out) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["split"] == "train"}


def test_a_second_method_trains_resumes_exports_and_evaluates(server, tiny_llama, tiny_dataset, tmp_path):
    straight = _train(server, tiny_dataset, tmp_path / "straight", "max_steps=8", "save_every=4")
    assert straight["steps"] == 8 and straight["stopped"] == "max_steps"
    losses = _losses(tmp_path / "straight")
    assert losses[8] < losses[1]  # it learns (next-next tokens of the tiny chats are predictable)
    ckpt = tmp_path / "straight" / "checkpoints" / "latest"
    assert json.loads((ckpt / "config.json").read_text())["model"]["method"] == IMPORT_PATH
    draft_config = json.loads((ckpt / "draft_config.json").read_text())
    assert set(draft_config) == {"hidden_size", "vocab_size", "draft_vocab_size", "layer_id", "rms_norm_eps"}
    # the asked vocabulary, not the one the tiny dataset pins (its whole vocabulary): data/vocab.py choose_vocab
    assert draft_config["draft_vocab_size"] == 256 < json.loads((tiny_dataset / "vocab.json").read_text())["vocab_size"]

    # Resume from the step-4 checkpoint: steps 5-8 see the same samples and reach the same losses.
    step4 = tmp_path / "straight" / "checkpoints" / "step_00000004"
    resumed = _train(server, tiny_dataset, tmp_path / "resumed", "max_steps=8", f"resume_from={step4}")
    assert resumed["steps"] == 8
    again = _losses(tmp_path / "resumed")
    assert sorted(again) == [5, 6, 7, 8]
    for s in range(5, 9):  # fp32 HF server: equal up to how the server batched the requests
        assert again[s] == pytest.approx(losses[s], rel=1e-4), s

    # Export in the method's own format, then the same eval command as EAGLE-3 drafts.
    out = tmp_path / "export"
    res = run_cli("draft_trainer", "export", "--checkpoint", str(ckpt), "--output", str(out), "--format", "toy")
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli("draft_trainer", "export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "x"))
    assert res.returncode == 2 and "exports toy" in res.stderr  # sglang is EAGLE-3's format, not this method's
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hello there", "tell me a story", "why"]))
    res = run_cli("draft_trainer", "eval", "--target-model", str(tiny_llama), "--draft", str(out),
                  "--prompts", str(prompts), "--num-steps", "1", "--max-new-tokens", "16")
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout)
    assert result["lossless"] and result["prompts"] == 3
    assert 1.0 <= result["tau"] <= 2.0 and len(result["accept_rate_per_position"]) == 1


def test_unknown_method_is_refused_listing_the_known_ones(tmp_path):
    res = run_cli("draft_trainer", "train", "model.method=eagle9", "data.path=x", "targets.embedded_model=y",
                  f"output_dir={tmp_path}")
    assert res.returncode == 2
    assert "model.method='eagle9' is not a known draft method; known: dflash, eagle3" in res.stderr


def test_every_shipped_config_selects_a_known_method():
    from pathlib import Path

    from common.config import load_config
    from draft_trainer.methods import method_class

    for path in sorted((Path(__file__).resolve().parents[2] / "draft_trainer" / "configs").glob("*.yaml")):
        cfg = load_config(TrainConfig, str(path), ["data.path=x"])
        assert method_class(cfg.model.method).name == cfg.model.method, path
