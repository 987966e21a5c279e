"""Typed configuration: nested dataclasses loaded from YAML and overridden from the command line.

    cfg = load_config(TrainConfig, "run.yaml", ["optim.lr=3e-4", "data.max_length=1024"])

Every error names the offending field (dotted path), the value and where it came from.
Values given on the command line are parsed as YAML scalars/lists (`1e-4`, `true`, `[1,14,26]`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from common.errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str, source: str) -> Any:
    """Check and convert `value` to the annotated type `tp` (raises ConfigError)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} ({source}) matches none of {tp}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} ({source}) is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        (item_tp, *_rest) = get_args(tp) or (Any,)
        if isinstance(value, str):  # "1,14,26" from a command line
            value = [yaml.safe_load(v) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r} ({source})")
        out = [_coerce(v, item_tp, f"{path}[{i}]", source) for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r} ({source})")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r} ({source})")
        return _build(tp, value, path, source)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r} ({source})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r} ({source})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r} ({source})")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r} ({source})")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{path}: expected a path, got {value!r} ({source})")
    raise ConfigError(f"{path}: unsupported config type {_type_name(tp)}")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown(cls: type, key: str, path: str, source: str) -> ConfigError:
    names = list(_fields(cls))
    hint = difflib.get_close_matches(key, names, n=1)
    did_you_mean = f"; did you mean '{hint[0]}'?" if hint else f"; valid fields: {', '.join(names)}"
    where = f"{path}.{key}" if path else key
    return ConfigError(f"unknown config field '{where}' ({source}){did_you_mean}")


def _build(cls: type[T], data: dict, path: str, source: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(cls, key, path, source)
        kwargs[key] = _coerce(value, hints[key], f"{path}.{key}" if path else key, source)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{path or cls.__name__}: {e} ({source})") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _check_path(cls: type, dotted: str) -> None:
    """Fail early with a did-you-mean for a misspelt command-line key."""
    tp: Any = cls
    walked = []
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"override '{dotted}': '{'.'.join(walked)}' is not a section")
        if part not in _fields(tp):
            raise _unknown(tp, part, ".".join(walked), "command line")
        tp = typing.get_type_hints(tp)[part]
        origin_args = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
        if origin_args:
            tp = origin_args[0]
        walked.append(part)


def parse_overrides(overrides: list[str], cls: type) -> dict:
    data: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        _check_path(cls, key)
        _set_dotted(data, key, yaml.safe_load(raw) if raw.strip() else "")
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from an optional YAML file plus `key.sub=value` overrides (later wins)."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded
        source = str(path)
    if overrides:
        # Validate the file first so an error is attributed to the right source.
        if data:
            _build(cls, data, "", source)
        data = _merge(data, parse_overrides(overrides, cls))
        source = f"{source} + command line" if path else "command line"
    return _build(cls, data, "", source)


def to_dict(cfg: Any) -> dict:
    """A plain, YAML-serialisable dict (Paths become strings)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
