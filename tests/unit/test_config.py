from dataclasses import dataclass, field
from typing import Literal

import pytest

from common.config import dump_yaml, load_config
from common.errors import ConfigError
from draft_trainer.config import TrainConfig


@dataclass
class Inner:
    lr: float = 1e-4
    layers: list[int] = field(default_factory=lambda: [1, 2, 3])
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 5\ninner:\n  lr: 3.0e-4\n  layers: [4, 5, 6]\n")
    cfg = load_config(Outer, f, ["inner.mode=b", "steps=7", "inner.layers=7,8,9", "flag=true"])
    assert cfg.steps == 7 and cfg.flag is True
    assert cfg.inner.lr == pytest.approx(3e-4)
    assert cfg.inner.layers == [7, 8, 9]
    assert cfg.inner.mode == "b"
    # A YAML 1.1 "1e-4" (a string to PyYAML) still becomes a float.
    assert load_config(Outer, None, ["inner.lr=1e-4"]).inner.lr == pytest.approx(1e-4)


def test_bad_type_names_field_value_and_source(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inner:\n  lr: fast\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, f)
    msg = str(e.value)
    assert "inner.lr" in msg and "'fast'" in msg and str(f) in msg


def test_unknown_field_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown config field 'inner.lrr'.*did you mean 'lr'"):
        load_config(Outer, None, ["inner.lrr=1"])


def test_literal_and_bool_are_strict():
    with pytest.raises(ConfigError, match="inner.mode"):
        load_config(Outer, None, ["inner.mode=c"])
    with pytest.raises(ConfigError, match="flag"):
        load_config(Outer, None, ["flag=3"])


def test_train_config_validation_and_dump(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        load_config(TrainConfig, None, [])
    cfg = load_config(TrainConfig, None, ["data.path=/x", "targets.embedded_model=/m", "optim.lr=2e-4"])
    text = dump_yaml(cfg)
    f = tmp_path / "round.yaml"
    f.write_text(text)
    assert load_config(TrainConfig, f) == cfg


def test_example_configs_stay_valid():
    from pathlib import Path

    import draft_trainer

    configs = sorted((Path(draft_trainer.__file__).parent / "configs").glob("*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        cfg = load_config(TrainConfig, path)
        assert "~" not in cfg.targets.embedded_model
