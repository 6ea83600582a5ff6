"""Config dataclasses <-> YAML files <-> CLI.

Every config in dualrerank is a (possibly nested) dataclass whose fields are declared with
`option(default, "help text")`. The same dataclass is read from YAML (`load_config`),
written back next to each run (`dump_config`) and documented in `--help`
(`describe_config`). Unknown keys and wrong types are `ConfigError`s, never silently
ignored: a typo in a config must not train the wrong model.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml

from dualrerank.errors import ConfigError

T = TypeVar("T")

__all__ = ["option", "load_config", "from_dict", "to_dict", "dump_config", "describe_config"]


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Any = None,
    choices: tuple | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field carrying help text, and optionally its allowed values (`choices`) or
    numeric domain (`ge`/`gt`/`le`/`lt` bounds), in its metadata. The domain is checked once,
    when a config is loaded (`from_dict`), and shown in `--help`; a float field with a domain
    must also be finite."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        meta["bounds"] = bounds
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_OK = {
    "ge": lambda v, b: v >= b,
    "gt": lambda v, b: v > b,
    "le": lambda v, b: v <= b,
    "lt": lambda v, b: v < b,
}


def domain_text(bounds: Mapping[str, float]) -> str:
    """`{'ge': 0, 'lt': 1}` -> '>= 0 and < 1'."""
    return " and ".join(f"{_BOUND_TEXT[k]} {v:g}" for k, v in bounds.items())


def check_domain(value: Any, bounds: Mapping[str, float], where: str) -> None:
    """`ConfigError` unless `value` (a number, or None for an optional field) lies in `bounds`."""
    if value is None or not bounds:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number {domain_text(bounds)}, got {value}")
    if not all(_BOUND_OK[k](value, b) for k, b in bounds.items()):
        raise ConfigError(f"{where}: must be {domain_text(bounds)}, got {value}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if typing.get_origin(tp) is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        cls = cast(type, tp)  # a type hint: the dataclass itself, never an instance
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(cls, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a (nested) dict; unknown keys and bad types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cast(Any, cls)) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        f = known[name]
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
            # A partial section overrides the field's own default (e.g. `OptimConfig(epochs=8)`),
            # not the section class's defaults.
            value = merge_dicts(to_dict(f.default_factory()), value)
        v = _coerce(value, hints[name], f"{where}.{name}")
        choices = f.metadata.get("choices")
        if choices is not None and v not in choices:
            raise ConfigError(f"{where}.{name}: {v!r} is not one of {list(choices)}")
        check_domain(v, f.metadata.get("bounds", {}), f"{where}.{name}")
        kwargs[name] = v
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return obj


def merge_dicts(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge of config mappings: `top` wins; nested mappings merge key by key."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict | None = None) -> T:
    """Read YAML file `path` (optional) into `cls`, then apply `overrides` (dotted keys allowed)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config: {p} is a directory; --config takes a YAML file")
        if not p.is_file():
            raise ConfigError(f"config: file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config: {p} is not UTF-8 text (byte {exc.start}); is it a YAML file?") from None
        except OSError as exc:
            raise ConfigError(f"config: cannot read {p} ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            at = f" at line {line + 1}" if line is not None else ""
            raise ConfigError(f"config: {p} is not valid YAML{at}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: {p} must hold a mapping at the top level")
        data = loaded
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return from_dict(cls, data, where=str(path) if path else "config")


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-ready structure of a config dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump_config(obj: Any, path: str | Path) -> None:
    """Write the config as YAML (atomically: temp file then rename)."""
    from dualrerank.files import write_text

    write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


def describe_config(cls: type, prefix: str = "", defaults: Any = None) -> list[str]:
    """One line per (nested) field: `key (default): help`, for --help and docs. Nested
    sections show their field's own defaults (`defaults`: the instance they come from)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "required"
        if dataclasses.is_dataclass(hints[f.name]):
            lines.extend(describe_config(hints[f.name], key + ".", default if default != "required" else None))
            continue
        bounds = f.metadata.get("bounds")
        domain = f" [{domain_text(bounds)}]" if bounds else ""
        lines.append(f"{key} ({default!r}){domain}: {f.metadata.get('help', '')}")
    return lines
