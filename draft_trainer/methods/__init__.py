"""The draft-method registry: the one place that maps `model.method` to an implementation.

Built-in methods are listed in `METHODS` (name -> "module:Class", imported on first use, so
choosing one method never imports another). A method outside this package is named by its
import path, `model.method=my_pkg.my_method:MyMethod`, and needs no change here.
"""

from __future__ import annotations

import importlib

from common.errors import ConfigError

METHODS: dict[str, str] = {
    "eagle3": "draft_trainer.methods.eagle3.method:Eagle3Method",
    "dflash": "draft_trainer.methods.dflash.method:DFlashMethod",
}


def method_class(name: str):
    """The DraftMethod subclass for `name` (a registered name or `module:Class`)."""
    from draft_trainer.methods.base import DraftMethod

    path = METHODS.get(name, name if ":" in name else None)
    if path is None:
        raise ConfigError(f"model.method={name!r} is not a known draft method; known: {', '.join(sorted(METHODS))} "
                          "(or give an importable `module:Class`)")
    module, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.method={name!r}: cannot import {path} ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, DraftMethod)):
        raise ConfigError(f"model.method={name!r}: {path} is not a DraftMethod subclass")
    return cls


def get_method(name: str, model_cfg):
    """An instance of the method `name`, configured by the run's `model` section."""
    return method_class(name)(model_cfg)


def method_for_export(config: dict):
    """The method class whose export `config` (an exported config.json) is, for eval/convert."""
    tagged = (config.get("specrelay") or {}).get("method")
    if tagged:
        return method_class(tagged)
    for name in METHODS:
        cls = method_class(name)
        if cls.recognises(config):
            return cls
    raise ConfigError(f"exported config.json (architectures {config.get('architectures')}) is not a draft any known "
                      f"method reads; known: {', '.join(sorted(METHODS))}")
