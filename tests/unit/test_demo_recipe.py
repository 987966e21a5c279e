"""The demo's training config: the recipe file plus what the demo adds (draft_trainer/demo.py
`train_config`). The recipe trains EAGLE-3.1; `--method` switches to another method, which must not
inherit the eagle3-only variant (the config would refuse it)."""

import argparse
from pathlib import Path

import pytest

from draft_trainer.demo import train_config


def _cfg(tmp_path: Path, **kw):
    args = argparse.Namespace(**{"tiny": False, "resume": False, "curve_points": 0, "method": None, "set": [], **kw})
    return train_config(args, tmp_path / "data", tmp_path / "model", tmp_path / "train", 1200.0)


def test_the_recipe_trains_eagle31_and_the_demo_adds_paths_and_budget(tmp_path):
    cfg = _cfg(tmp_path)
    assert (cfg.model.method, cfg.model.eagle_variant) == ("eagle3", "3.1")
    assert cfg.time_budget_s == 1200.0 and cfg.save_every_s == 0
    assert cfg.feature_cache.dir == str(tmp_path / "train" / "features") and cfg.resume_from == ""
    assert _cfg(tmp_path, curve_points=4, resume=True).save_every_s == pytest.approx(240.0)
    assert _cfg(tmp_path, resume=True).resume_from == "auto"


@pytest.mark.parametrize("method, variant", [("dflash", "3"), ("eagle3", "3.1")])
def test_method_flag_keeps_the_variant_for_eagle3_only(tmp_path, method, variant):
    cfg = _cfg(tmp_path, method=method)
    assert (cfg.model.method, cfg.model.eagle_variant) == (method, variant)


def test_set_overrides_the_recipe_and_the_demo(tmp_path):
    """--set KEY=VALUE reaches the recipe last: it wins over the recipe and over what the demo adds
    (e.g. continuing a run trained as plain EAGLE-3 needs model.eagle_variant=3)."""
    cfg = _cfg(tmp_path, set=["model.eagle_variant=3", "optim.lr=0.001", "save_every_s=60"], curve_points=4)
    assert (cfg.model.eagle_variant, cfg.optim.lr, cfg.save_every_s) == ("3", 0.001, 60.0)
    with pytest.raises(Exception, match="no_such_field"):
        _cfg(tmp_path, set=["model.no_such_field=1"])


def test_answers_are_sized_by_the_targets_dtype_unless_asked():
    """bf16 (native): up to 1,500 within the regeneration minutes; fp32 (no native bf16): all of 250, where
    the trainer replays more epochs of fewer answers (docs/demo.md, session 20); a count asked for is answered
    in full, with the minutes given, if any."""
    from draft_trainer.demo import REGEN_CONVERSATIONS, REGEN_CONVERSATIONS_FP32, REGEN_MINUTES, regen_size

    assert regen_size(None, None, "bf16") == (REGEN_CONVERSATIONS, REGEN_MINUTES) == (1500, 8.0)
    assert regen_size(None, None, "fp32") == (REGEN_CONVERSATIONS_FP32, 0.0) == (250, 0.0)
    assert regen_size(None, 3.0, "bf16") == (1500, 3.0)
    assert regen_size(None, 3.0, "fp32") == (250, 3.0)
    assert regen_size(600, None, "bf16") == regen_size(600, None, "fp32") == (600, 0.0)
    assert regen_size(600, 5.0, "fp32") == (600, 5.0)
    assert regen_size(0, None, "bf16") == (0, 0.0)   # ShareGPT's own answers
