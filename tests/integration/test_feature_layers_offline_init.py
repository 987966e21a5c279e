"""`model.feature_layers` (the draft reads chosen target layers, the final one included) and
`model.init=target` from an offline feature cache: the online run keeps the target tensors its
init fetched in the cache, so an offline run starts from the same draft and trains the same
trajectory without any server; a cache written by a run with another init is refused by name."""

from __future__ import annotations

import json

from tests.support.procs import run_cli

LAYERS = [0, 1, 3]  # the tiny Llama has 4 layers: 3 is the last (the final norm's input)


def _train(dataset, out, *extra, ok=True):
    res = run_cli("draft_trainer", "train", f"data.path={dataset}", f"output_dir={out}", "batch_size=4",
                  "optim.lr=1e-2", "progress=false", "optim.warmup_ratio=0", "data.draft_vocab_size=256",
                  "model.ttt_steps=2", "model.precision=fp32", "max_steps=4", "save_initial=true", *extra,
                  timeout=300)
    if ok:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def _records(out, split: str) -> list[dict]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().split("\n") if x.strip()]
    return [r for r in recs if r["split"] == split]


def _losses(out) -> list[float]:
    return [r["loss"] for r in _records(out, "train")]


def test_chosen_layers_and_target_init_train_offline_like_online(exact_tiny_server, tiny_dataset, tmp_path):
    cache = tmp_path / "cache"
    common = ["model.init=target", f"model.feature_layers=[{','.join(map(str, LAYERS))}]", "eval.holdout=4"]
    _train(tiny_dataset, tmp_path / "online", *common, f"targets.endpoints={exact_tiny_server.endpoint}",
           f"feature_cache.dir={cache}")
    step0 = tmp_path / "online" / "checkpoints" / "step_00000000"
    assert json.loads((step0 / "draft_config.json").read_text())["aux_layer_ids"] == LAYERS

    _train(tiny_dataset, tmp_path / "offline", *common, f"feature_cache.dir={cache}", "feature_cache.offline=true")
    online, offline = _losses(tmp_path / "online"), _losses(tmp_path / "offline")
    assert len(online) == 4 and offline == online   # same start (init from the cached layer), same features
    # The held-out samples' features were cached too: the offline run evaluates on the same samples.
    ev_on, ev_off = _records(tmp_path / "online", "eval")[-1], _records(tmp_path / "offline", "eval")[-1]
    assert ev_on["positions"][0] > 0 and ev_off["positions"] == ev_on["positions"]
    assert ev_off["loss"] == ev_on["loss"]

    # The exported draft tells SGLang which layers to capture.
    res = run_cli("draft_trainer", "export", "--checkpoint", str(tmp_path / "offline" / "checkpoints" / "latest"),
                  "--output", str(tmp_path / "export"))
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == LAYERS


def test_offline_target_init_needs_a_cache_that_kept_the_layer(exact_tiny_server, tiny_dataset, tmp_path):
    cache = tmp_path / "cache"
    _train(tiny_dataset, tmp_path / "online", "model.init=random", f"targets.endpoints={exact_tiny_server.endpoint}",
           f"feature_cache.dir={cache}")
    res = _train(tiny_dataset, tmp_path / "offline", "model.init=target", f"feature_cache.dir={cache}",
                 "feature_cache.offline=true", ok=False)
    assert res.returncode != 0
    assert "does not hold the target tensors ['final_norm'" in res.stderr and "model.init=random" in res.stderr


def test_feature_layers_are_checked(tmp_path):
    res = run_cli("draft_trainer", "train", "data.path=x", "targets.embedded_model=y", f"output_dir={tmp_path}",
                  "model.feature_layers=[14,1,29]")
    assert res.returncode == 2 and "model.feature_layers: [14, 1, 29] must be distinct layer ids" in res.stderr
