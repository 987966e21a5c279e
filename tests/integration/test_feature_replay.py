"""`feature_cache.replay`: an online run reads its later epochs back from the feature cache it writes.

The target computes each sample's features once per run instead of once per epoch, and training
does not change: the losses equal, bit for bit, those of a run that asks the target every epoch.
A run stopped mid-way and resumed replays what the first part cached without writing it twice;
a cache of another dataset is refused by name (sample ids would pair the wrong features)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from draft_trainer.assets.tiny import build_tiny_dataset
from tests.support.procs import run_cli

SAMPLES = 48  # build_tiny_dataset's default
EPOCHS = 3


def _train(dataset, out, server, *extra, ok=True):
    res = run_cli("draft_trainer", "train", f"data.path={dataset}", f"output_dir={out}", "batch_size=8",
                  f"targets.endpoints={server.endpoint}", "progress=false", "data.draft_vocab_size=256",
                  "model.ttt_steps=2", "model.precision=fp32", f"epochs={EPOCHS}", "max_steps=1000", "threads=1",
                  "log_every=1", *extra, timeout=300)
    if ok:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def _losses(out) -> list[float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in recs if r["split"] == "train"]


def _cached_rows(cache) -> int:
    return sum(pa.ipc.open_file(pa.memory_map(str(p), "r")).read_all().num_rows for p in cache.glob("shard-*.arrow"))


def test_replay_trains_like_online_and_asks_the_target_once_per_sample(exact_tiny_server, tiny_dataset, tmp_path):
    _train(tiny_dataset, tmp_path / "online", exact_tiny_server)
    cache = tmp_path / "cache"
    res = _train(tiny_dataset, tmp_path / "replay", exact_tiny_server, f"feature_cache.dir={cache}",
                 "feature_cache.replay=true")
    online, replay = _losses(tmp_path / "online"), _losses(tmp_path / "replay")
    assert len(online) == SAMPLES * EPOCHS // 8 and replay == online
    src = json.loads((tmp_path / "replay" / "summary.json").read_text())["pool"]
    assert src["requested"] == SAMPLES and src["replayed"] == SAMPLES * (EPOCHS - 1)
    assert [t["dispatched"] for t in src["targets"]] == [SAMPLES]   # one targets stream: epoch 0's
    assert _cached_rows(cache) == SAMPLES
    assert "epoch 1: 48 sample(s) from the feature cache, 0 from the targets" in res.stderr


def test_a_resumed_replay_reads_what_the_first_part_cached(exact_tiny_server, tiny_dataset, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "run"
    common = (f"feature_cache.dir={cache}", "feature_cache.replay=true", "save_every=1")
    _train(tiny_dataset, out, exact_tiny_server, *common, "max_steps=9")          # stops in epoch 1 (6 steps an epoch)
    first = _losses(out)
    res = _train(tiny_dataset, out, exact_tiny_server, *common, "resume_from=auto", "feature_cache.replay_threads=2")
    assert _losses(out)[:9] == first and len(_losses(out)) == SAMPLES * EPOCHS // 8
    src = json.loads((out / "summary.json").read_text())["pool"]
    assert src["requested"] == 0 and src["replayed"] == SAMPLES * EPOCHS - 9 * 8
    assert _cached_rows(cache) == SAMPLES                               # nothing written twice
    assert "epoch read from the feature cache: 2 torch thread(s)" in res.stderr


def test_a_cache_of_another_dataset_is_refused(exact_tiny_server, tiny_llama, tiny_dataset, tmp_path):
    cache = tmp_path / "cache"
    _train(tiny_dataset, tmp_path / "a", exact_tiny_server, f"feature_cache.dir={cache}", "max_steps=1")
    other = build_tiny_dataset(tiny_llama, tmp_path / "other", num_samples=16, seed=7)
    res = _train(other, tmp_path / "b", exact_tiny_server, f"feature_cache.dir={cache}", "feature_cache.replay=true",
                 ok=False)
    assert res.returncode != 0 and "holds features of another dataset" in res.stderr
    res = _train(other, tmp_path / "c", exact_tiny_server, f"feature_cache.dir={cache}", "feature_cache.offline=true",
                 ok=False)
    assert res.returncode != 0 and "holds the features of another dataset" in res.stderr


@pytest.mark.parametrize("args, message", [
    (["feature_cache.replay=true"], "feature_cache.replay=true needs feature_cache.dir"),
    (["feature_cache.replay=true", "feature_cache.offline=true", "feature_cache.dir=x"],
     "drop one of feature_cache.replay / feature_cache.offline"),
])
def test_replay_settings_are_checked(tmp_path, args, message):
    res = run_cli("draft_trainer", "train", "data.path=x", "targets.embedded_model=y", f"output_dir={tmp_path}", *args)
    assert res.returncode == 2 and message in res.stderr
