"""Training over the wire with aux and teacher as float8_e4m3 (targets.wire_dtypes), end to end on a
real synthetic server: the same samples in the same order, losses close to the full-precision run
but not identical (the features really went through e4m3)."""

import json

from common.config import load_config
from draft_trainer.assets.tiny import build_synthetic_dataset
from draft_trainer.config import TrainConfig
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
                           "targets.wire_dtypes=aux=float8_e4m3,teacher=float8_e4m3")).run()
    finally:
        srv.stop()
    recs = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("full", "fp8")]
    assert full["steps"] == fp8["steps"] == 6
    assert [r["sample_ids"] for r in recs[0]] == [r["sample_ids"] for r in recs[1]]
    la, lb = [r["loss"] for r in recs[0]], [r["loss"] for r in recs[1]]
    assert la != lb
    assert all(abs(a - b) <= 0.05 * abs(a) for a, b in zip(la, lb)), (la, lb)
