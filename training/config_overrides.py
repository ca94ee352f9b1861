"""Config files and `--set key=value`: they only override dataclass fields (an unknown key is an error, a
value of the wrong type too), layered with `merge_overrides` and applied with `apply_overrides`; `to_plain`
turns a config back into the dicts that are printed and saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if arg is type(None) and value is None:
                return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):  # `steps: 5e4` (YAML 1.1 reads it as a string)
            with contextlib.suppress(ValueError):
                number = float(value)
                if number.is_integer():
                    return int(number)
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-6` (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    elif origin is tuple:
        if isinstance(value, list | tuple):
            args = typing.get_args(hint)
            item = args[0] if args else Any
            return tuple(_coerce(v, item, where) if item is not Any else v for v in value)
    elif hint is Any:
        return value
    raise ValueError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def apply_overrides(obj: Any, values: Mapping[str, Any], where: str = "config") -> Any:
    """A copy of dataclass `obj` with `values` applied (nested dataclasses from nested mappings).

    Unknown keys and values of the wrong type raise ValueError naming the key."""
    if not dataclasses.is_dataclass(obj):
        raise TypeError(f"{where} is not a config section")
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in values.items():
        if key not in known:
            from manifests.messages import did_you_mean

            section = where.removeprefix("config").lstrip(".")
            hint = did_you_mean(key, known, f"{section}." if section else "")
            listing = f" Known keys: {sorted(known)}" if hint else f"; known keys: {sorted(known)}"
            raise ValueError(f"unknown key {where}.{key}{hint}{listing}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}.{key} is a section: give a mapping")
            changes[key] = apply_overrides(current, value, f"{where}.{key}")
        else:
            changes[key] = _coerce(value, hints[key], f"{where}.{key}")
    return dataclasses.replace(obj, **changes)


def parse_set(items: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-4", "data.frames=16"]` -> {"train": {"lr": 1e-4}, "data": {"frames": 16}} (YAML values)."""
    import yaml

    from manifests.messages import load_yaml, yaml_problem

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value, got {item!r}")
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {item}: the value is not valid YAML ({yaml_problem(exc)})") from exc
    return out


def load_overrides(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping (empty file: no overrides)."""
    import yaml

    from manifests.messages import load_yaml, yaml_problem

    try:
        data = load_yaml(Path(path).read_text()) or {}
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the config file ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not a valid YAML config ({yaml_problem(exc)})") from exc
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: a config file is a mapping of sections (train, data, <stage>)")
    return dict(data)


def merge_overrides(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers win, recursively."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merge_overrides(out[key], value)
            else:
                out[key] = value
    return out


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists (for JSON/YAML)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    return obj
