"""The thin end-to-end path over the real wire: a target-server process on 127.0.0.1 serves
features; `draft-trainer train` (another process) trains against it and writes a checkpoint."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from draft_trainer.client.target import TargetClient
from draft_trainer.export import load_trained_draft
from tests.support.procs import run_cli, start_server


@pytest.fixture
def server(tiny_llama, tmp_path):
    srv = start_server(tmp_path, "--model", str(tiny_llama), "--backend", "hf", "--dtype", "fp32")
    yield srv
    srv.stop()


def test_served_hidden_states_equal_transformers(server, tiny_llama):
    client = TargetClient(server.endpoint)
    info = client.model_info()
    ids = [5, 17, 42, 99, 3, 250, 7, 8, 300, 11]
    (feat,) = list(client.features([7], [ids]))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    want_aux = torch.cat([hs[i + 1][0] for i in info.aux_layer_ids], dim=-1)
    assert feat.sample_id == 7 and feat.aux_T3H.shape == (len(ids), 3 * info.hidden_size)
    assert torch.equal(feat.aux_T3H, want_aux)           # fp32: exact
    assert torch.equal(feat.teacher_TH, hs[-1][0])       # final normed hidden state
    client.close()


def test_train_thin_path_loss_decreases(server, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    res = run_cli("draft_trainer", "train", f"targets.endpoints={server.endpoint}", f"data.path={tiny_dataset}",
                  f"output_dir={out}", "max_steps=30", "batch_size=4", "epochs=5", "optim.lr=3e-3",
                  "optim.warmup_ratio=0.1", "model.ttt_steps=3", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 30
    first = sum(r["loss"] for r in recs[:5]) / 5
    last = sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30
    ckpt = out / "checkpoints" / "latest"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "vocab.json").is_file()
    trained = load_trained_draft(ckpt)
    assert "fc.weight" in trained.state and not any(k.startswith("embed_tokens") for k in trained.state)
