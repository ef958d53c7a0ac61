"""Loading a JSON file into a tree of small dataclasses, with errors that name the file and key.

Kept apart from the config classes themselves (engine/config.py) so that any component may
declare its own dataclass and have it embedded in the tree without knowing about JSON.
A dataclass validates its own values in ``__post_init__`` by raising ``ValueError`` whose
message starts with the field name (``"lr: must be > 0"``); the loader prefixes the file and
the full key path. A nested field whose default is not its class's defaults (the toy world's
sampling: CFG 1.5, not 7.5) is marked ``metadata=OVERLAY``: a partial section in the file
changes only the keys it names, on top of that default.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from sail.engine.errors import InputError


class ConfigError(InputError):
    """A config file, key or value is wrong; the message names the file and the key."""


OVERLAY = {"overlay": True}   # field metadata: a partial section overlays the field's default


def _overlay(base: dict, value: dict) -> dict:
    out = dict(base)
    for k, v in value.items():
        out[k] = _overlay(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists/dicts to dataclasses."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {key}: must be one of {list(choices)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected an object, got {value!r}")
        return build_dataclass(tp, value, where, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: {key}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected an object, got {value!r}")
        args = typing.get_args(tp)   # dict[str, X]: each value checked (and built) as an X
        return {k: _convert(v, args[1], f"{key}.{k}", where) for k, v in value.items()} if args else dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: {key}: unsupported annotation {_type_name(tp)}")


def build_dataclass(cls: type, data: dict, where: str = "<dict>", prefix: str = "") -> Any:
    """Build ``cls`` from a JSON object; unknown keys, wrong types and bad values are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(fields))})")
        f = fields[name]
        if f.metadata.get("overlay") and isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
            value = _overlay(to_dict(f.default_factory()), value)
        kwargs[name] = _convert(value, hints[name], key, where)
    try:
        return cls(**kwargs)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        field, _, msg = str(err).partition(":")
        key = f"{prefix}.{field}" if prefix else field
        raise ConfigError(f"{where}: {key}:{msg}") from None


def to_dict(obj: Any) -> Any:
    """The JSON-able dict of a config tree (inverse of ``build_dataclass``)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list[str], where: str) -> dict:
    """Apply ``a.b=value`` overrides to a raw config dict (value parsed as JSON, else string)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-5")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{where}: --set {key}: '{part}' is not an object")
            node = child
        node[parts[-1]] = value
    return data


def read_json(path: Path) -> dict:
    """Read a JSON object from ``path`` with an error naming the file and line on bad JSON."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def load_dataclass(cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """``cls`` from an optional JSON file of its fields plus ``KEY=VALUE`` overrides: the
    ``--config FILE --set KEY=VALUE`` of the launch scripts. Errors name the file and the key."""
    data = read_json(Path(path)) if path else {}
    where = str(path) if path else f"<{cls.__name__} defaults>"
    return build_dataclass(cls, apply_overrides(data, list(overrides), where), where)


def require(cond: bool, field: str, msg: str) -> None:
    """Raise the ``ValueError`` that ``build_dataclass`` turns into a keyed ConfigError."""
    if not cond:
        raise ValueError(f"{field}: {msg}")
