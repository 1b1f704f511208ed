"""Typed configuration trees: YAML files and dotted ``key=value`` overrides onto dataclasses.

Every job config is a tree of small ``kw_only`` dataclasses (one per concern) whose fields carry the
only defaults. YAML and the CLI can only override existing fields: unknown keys raise ``ConfigError``
naming the dotted path. Enum fields accept their string values; tuples accept lists.
"""
from __future__ import annotations

import dataclasses
import enum
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kvpo_megatron.errors import ConfigError

T = TypeVar("T")


def _coerce(tp, value, path: str):
    """``value`` (from YAML or an override) as type ``tp``, or a ``ConfigError`` naming ``path``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path} is a section: give its fields ({path}.<field>=... or a mapping), "
                              f"got {value!r}")
        return from_dict(tp, value, path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{path} must be one of {[e.value for e in tp]}, got {value!r}") from None
    if origin is tuple or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{path} must have {len(args)} entries, got {len(value)}: {list(value)!r}")
        kinds = args[:1] if origin is list or (args and args[-1] is Ellipsis) else args
        items = [_coerce(kinds[min(i, len(kinds) - 1)], v, f"{path}[{i}]") if kinds else v
                 for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if (origin is dict or tp is dict) and not isinstance(value, dict):
        raise ConfigError(f"{path} must be a mapping, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{path} must be true or false, got {value!r}")
    if tp is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{path} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-2" as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{path} must be a number, got {value!r}") from None
        if not isinstance(value, float):
            raise ConfigError(f"{path} must be a number, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{path} must be a string, got {value!r} (quote it)")
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build ``cls`` from a nested dict; unknown keys raise with their dotted path."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in {path}" if path else ""
        raise ConfigError(f"unknown config key(s){where}: {', '.join(unknown)}")
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1,2]"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> T:
    """``base`` tree (e.g. a named preset) <- YAML file (optional) <- overrides -> ``cls``."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {'is a directory' if p.is_dir() else 'not found'}: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {' '.join(str(e).split())}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must be a mapping of sections (e.g. 'optim: {{lr: 1e-5}}'), got a "
                              f"{type(data).__name__}: {data!r:.80}")
    return from_dict(cls, deep_merge(deep_merge(base or {}, data), parse_overrides(overrides or [])))


def to_dict(obj) -> Any:
    """Dataclass tree -> plain dict (enums as values), for logging and checkpoints."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
