"""Typed configuration from plain dicts, with errors that name the field.

Every configuration object of the project (SearchConfig, EvalConfig, SweepConfig) is a dataclass
built from the same kind of nested dict that a YAML file holds. `from_dict` checks each value
against the dataclass's type hints and the `min`/`max`/`gt` bounds in the field's metadata, and
raises `ConfigError` with the dotted path of the field, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Union

import yaml

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)$")


_BOOL_WORDS = {False: ("off", "no", "false"), True: ("on", "yes", "true")}


class ConfigError(ValueError):
    """A configuration value that is not allowed. `field` is the dotted path, e.g. `model.channels`."""

    def __init__(self, field: str, value: Any, allowed: str):
        # A key typed with control characters is shown escaped: the error stays one line.
        self.field = "".join(c if c.isprintable() else repr(c)[1:-1] for c in field)
        self.value = value
        self.allowed = allowed
        super().__init__(f"{self.field or '<config>'}: got {_show(value)}; {allowed}")


def _show(value: Any) -> str:
    """The value as typed, cut to one readable line: 80 characters, 300 for a string (a path)."""
    text = repr(value)
    limit = 300 if isinstance(value, str) else 80
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _join(path: str, key: str) -> str:
    """`path.key`; a key that is empty, padded or not printable shown quoted (one line, visible)."""
    if not key or not key.isprintable() or key != key.strip():
        key = repr(key)
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        return "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Checks `value` against type `tp` and returns it in canonical form (tuples for lists)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans
            spelled = [w for w in _BOOL_WORDS[value] if w in allowed]
            if spelled:
                return spelled[0]
        elif value in allowed:
            return value
        raise ConfigError(path, value, f"expected {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(path, value, f"expected {_type_name(tp)}")
        errors: list[ConfigError] = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ConfigError as err:
                errors.append(err)
        # The option that got furthest into the value explains more than "expected A or B".
        deepest = max(errors, key=lambda err: len(err.field), default=None)
        if deepest is not None and deepest.field != path:
            raise deepest
        raise ConfigError(path, value, f"expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(path, value, "expected a mapping of its fields")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise ConfigError(path, value, "expected a list")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(_convert(item_tp, item, f"{path}[{i}]") for i, item in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(path, value, "expected a mapping")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {_convert(key_tp, k, path): _convert(value_tp, v, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, value, "expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(path, value, "expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(path, value, "expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, value, "expected a string")
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _check_bounds(field: dataclasses.Field, value: Any, path: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    meta = field.metadata
    if "min" in meta and value < meta["min"]:
        raise ConfigError(path, value, f"must be >= {meta['min']}")
    if "gt" in meta and value <= meta["gt"]:
        raise ConfigError(path, value, f"must be > {meta['gt']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(path, value, f"must be <= {meta['max']}")


def from_dict(cls: type, data: Mapping[str, Any] | None, path: str = "") -> Any:
    """Builds dataclass `cls` from a nested mapping; unknown keys and bad values raise ConfigError.

    After construction, a `validate(path)` method on the dataclass, if any, checks relations
    between fields.
    """
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(_join(path, str(key)), data[key], f"unknown key; {hint}allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        field_path = _join(path, name)
        converted = _convert(hints[name], value, field_path)
        _check_bounds(fields[name], converted, field_path)
        kwargs[name] = converted
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(path)
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass (or nested structure) as plain dicts and lists, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def flatten_mapping(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and empty mappings stay values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_mapping(value, name + "."))
        else:
            flat[name] = value
    return flat


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`; nested mappings merge, everything else is replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=VALUE` as (["a", "b"], value), with VALUE read as YAML (`3 of 14` stays a string)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("--set", text, "expected KEY=VALUE with a dotted key, e.g. model.channels=8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _NUMBER.match(value):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    return key.split("."), value


def set_dotted(data: dict[str, Any], key: str | list[str], value: Any) -> None:
    """data["a"]["b"] = value for key "a.b", creating mappings on the way."""
    keys = key.split(".") if isinstance(key, str) else key
    node = data
    for depth, name in enumerate(keys[:-1]):
        child = node.get(name)
        if child is None:
            child = node[name] = {}
        elif not isinstance(child, dict):
            raise ConfigError(".".join(keys[: depth + 1]), child, "is not a mapping; cannot set a key inside it")
        node = child
    node[keys[-1]] = value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Applies `--set key=value` strings (dotted keys mirror the YAML) to a nested dict."""
    result = copy.deepcopy(dict(data))
    for text in overrides:
        keys, value = parse_override(text)
        set_dotted(result, keys, value)
    return result


def file_with_overrides(file: str | os.PathLike | Mapping[str, Any] | None, overrides: Iterable[str]) -> dict[str, Any]:
    """A config file (YAML path, or an already-read mapping) with `--set` overrides applied."""
    raw = load_yaml(str(file)) if isinstance(file, (str, os.PathLike)) else dict(file or {})
    return apply_overrides(raw, overrides)


def load_yaml(path: str) -> dict[str, Any]:
    """Reads a YAML mapping; an empty file is an empty mapping."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError("config", path, "file not found") from None
    except UnicodeDecodeError as err:
        raise ConfigError("config", path, f"is not a text file (byte {err.start} is not UTF-8)") from None
    except OSError as err:
        raise ConfigError("config", path, f"cannot be read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError("config", path, f"is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a single string"}.get(type(data), f"a {type(data).__name__}")
        raise ConfigError("config", path, f"expected a YAML mapping of settings (key: value lines), found {kind}")
    return data
