"""Training over the wire with aux and teacher as float8_e4m3 (targets.wire_dtypes), end to end on a
real synthetic server: the same samples in the same order, losses close to the full-precision run
but not identical (the features really went through e4m3); the feature cache the fp8 run writes
holds the served dtype, equal to the client's upcast of the same features fetched as fp8."""

import json

import torch

from common.config import load_config
from draft_trainer.assets.tiny import build_synthetic_dataset
from common.fp8 import Fp8Rows
from draft_trainer.client.target import TargetClient
from draft_trainer.config import TrainConfig
from draft_trainer.data.dataset import TokenizedDataset
from draft_trainer.data.feature_cache import FeatureCacheReader
from draft_trainer.train.loop import Trainer
from tests.support.pool import syn
from tests.support.procs import start_servers


def _cfg(dataset, out, endpoint, *extra):
    return load_config(TrainConfig, None, [
        f"targets.endpoints={endpoint}", f"data.path={dataset}", f"output_dir={out}", "max_steps=6", "batch_size=2",
        "model.ttt_steps=2", "optim.lr=3e-3", "log_every=100", "targets.request_tokens=128", "targets.hedge_after_s=0",
        *extra])


def test_fp8_wire_trains_on_the_same_samples_with_close_losses(tmp_path):
    dataset = build_synthetic_dataset(tmp_path / "syn", 16, min_len=24, max_len=48)
    (srv,) = start_servers(tmp_path, [("s", syn(0))])
    try:
        full = Trainer(_cfg(dataset, tmp_path / "full", srv.endpoint)).run()
        fp8 = Trainer(_cfg(dataset, tmp_path / "fp8", srv.endpoint,
                           "targets.wire_dtypes=aux=float8_e4m3,teacher=float8_e4m3",
                           f"feature_cache.dir={tmp_path / 'cache'}")).run()
        checked = _cache_is_the_upcast_of_the_wire(tmp_path / "cache", dataset, srv.endpoint)
    finally:
        srv.stop()
    assert checked >= 8
    recs = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("full", "fp8")]
    assert full["steps"] == fp8["steps"] == 6
    assert [r["sample_ids"] for r in recs[0]] == [r["sample_ids"] for r in recs[1]]
    la, lb = [r["loss"] for r in recs[0]], [r["loss"] for r in recs[1]]
    assert la != lb
    assert all(abs(a - b) <= 0.05 * abs(a) for a, b in zip(la, lb)), (la, lb)


def _cache_is_the_upcast_of_the_wire(cache_dir, dataset, endpoint) -> int:
    cache, data, client = FeatureCacheReader(cache_dir), TokenizedDataset(dataset), TargetClient(endpoint)
    checked = 0
    try:
        for i in range(len(data)):
            sid, ids, _ = data[i]
            c = cache.get(sid)
            if c is None:
                continue
            (f,) = client.features([sid], [ids[: c.length].tolist()],
                                   tensor_dtypes={"aux": "float8_e4m3", "teacher": "float8_e4m3"})
            assert isinstance(f.aux_T3H, Fp8Rows) and isinstance(f.teacher_TH, Fp8Rows)
            up = f.upcast()
            assert not isinstance(c.aux_T3H, Fp8Rows) and c.aux_T3H.dtype == up.aux_T3H.dtype
            assert torch.equal(c.aux_T3H, up.aux_T3H) and torch.equal(c.teacher_TH, up.teacher_TH)
            checked += 1
    finally:
        client.close()
    return checked
