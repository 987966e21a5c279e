"""The backends a server can run: one table from `--backend NAME` to its class and config section.

A backend's *section* is the ServerConfig fields only it (or a few backends) reads (`--tp` for
sglang, `--batch-invariant` for hf and sglang, the `--synthetic-*` shape for synthetic); the shared fields (model, device, dtype, aux layers, max
length, max top-k, batch budget) go to every backend through its `from_config(cfg)`. A section
field set away from its default for a backend that does not read it is refused, so no option is
silently ignored. Backend modules are imported only when chosen (sglang pulls in SGLang).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields

from common.errors import ConfigError


@dataclass(frozen=True)
class BackendEntry:
    name: str
    target: str  # "module:Class"; the class has `from_config(ServerConfig)`
    needs_model: bool  # reads --model (a local HF model directory)
    section: tuple[str, ...] = ()  # ServerConfig fields only this backend (and those listing them too) reads


BACKENDS: dict[str, BackendEntry] = {e.name: e for e in (
    BackendEntry("hf", "target_server.backends.hf:HFBackend", needs_model=True, section=("batch_invariant",)),
    BackendEntry("synthetic", "target_server.backends.synthetic:SyntheticBackend", needs_model=False,
                 section=("synthetic_hidden_size", "synthetic_num_layers", "synthetic_vocab_size",
                          "synthetic_cost_per_token_us")),
    BackendEntry("sglang", "target_server.backends.sglang:SGLangBackend", needs_model=True,
                 section=("tp", "batch_invariant")),
)}


def entry(name: str) -> BackendEntry:
    if name not in BACKENDS:
        raise ConfigError(f"backend: {name!r} is not one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def check_sections(cfg) -> None:
    """Refuse options of another backend's section (set away from their defaults) and a missing --model."""
    e = entry(cfg.backend)
    if e.needs_model and not cfg.model:
        needing = ", ".join(n for n, x in BACKENDS.items() if x.needs_model)
        raise ConfigError(f"--model: required for the {needing} backends (a local HF model directory)")
    defaults = {f.name: f.default for f in fields(type(cfg))}
    for other in BACKENDS.values():
        if other.name == e.name:
            continue
        for f in other.section:
            value = getattr(cfg, f)
            if f not in e.section and value != defaults[f]:
                readers = " or ".join(n for n, x in BACKENDS.items() if f in x.section)
                raise ConfigError(f"{_flag(f)} {value} needs --backend {readers} "
                                  f"(the {e.name} backend does not use it)")


def backend_class(name: str):
    module, cls = entry(name).target.split(":")
    return getattr(importlib.import_module(module), cls)


def load_backend(cfg):
    """The backend `cfg.backend` names, built from `cfg` (its shared fields + its section)."""
    return backend_class(cfg.backend).from_config(cfg)
