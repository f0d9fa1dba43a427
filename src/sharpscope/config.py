"""Typed dataclass configs: defaults in code, TOML files, dotted command-line overrides.

Every config in sharpscope is a (possibly nested) dataclass whose fields carry their
documented defaults. A user changes them with a TOML file and/or ``key.sub=value``
overrides; unknown keys are errors (a typo must never be silently ignored), and the
resolved config is what gets written into a run's ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

T = TypeVar("T")


def check_number(name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
                 high_open: bool = False, what: str) -> None:
    """Raise ValueError ``"<name> must be <what>, not <value>"`` unless ``value`` is a finite
    real number (not a bool) between ``low`` and ``high``, each end open or closed. The
    settings checks of the stability guard and the automatic warmup share it."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name} must be {what}, not {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    """Raise ValueError ``"<name> must be a positive integer, not <value>"`` unless ``value``
    is an int (not a bool) of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert ``value`` (from TOML or a command-line string) to ``annotation``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise UserError(f"config key '{where}' must be a table of settings, got {value!r}")
        return from_dict(annotation, value, prefix=where + ".")
    if origin is typing.Union or (origin is not None and str(origin) == "types.UnionType"):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        return _coerce(value, non_none[0], where)
    if origin in (list, tuple):
        item_type = args[0] if args else Any
        if isinstance(value, str) and value.strip().startswith("["):
            value = _toml_list(value, where)  # a TOML list on the command line: ["code", "prose"]
        elif isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{where}' must be a list, got {value!r}")
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise UserError(f"config key '{where}' must be true or false, got {value!r}")
    if annotation is int:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"config key '{where}' must be an integer, got {value!r}") from None
    if annotation is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"config key '{where}' must be a number, got {value!r}") from None
    if annotation is str:
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys by name."""
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        known = ", ".join(sorted(types))
        raise UserError(f"unknown config key '{prefix}{unknown[0]}' (known keys here: {known})")
    kwargs = {k: _coerce(v, types[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain JSON-ready data."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _toml_list(text: str, where: str) -> list:
    import tomllib

    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config key '{where}': {text!r} is not a TOML list ({exc}); write a,b,c or "
                        '["a", "b", "c"]') from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into the nested dict ``{"a": {"b": "1"}, "c": "x"}``."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value (e.g. noise.sigma=0.05)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise UserError(f"override '{item}' has an empty key part")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}' conflicts with another override of '{part}'")
        node[parts[-1]] = value.strip()
    return nested


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults, then the TOML file at ``path`` (if any), then dotted ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file '{path}' not found; pass the path of an existing TOML file")
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"config file '{path}' is not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise UserError(f"config file '{path}' is not UTF-8 text; save it as UTF-8") from None
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    return from_dict(cls, data)
