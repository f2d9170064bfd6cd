"""YAML files that mirror config dataclasses: unknown keys and wrong types are user errors."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from compress.errors import UserError


def read_yaml_mapping(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist: check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}: fix the syntax")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of settings (key: value), not a {type(data).__name__}")
    return data


def _accepts(annotation, value) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(annotation) or (typing.Any,)
        return isinstance(value, list) and all(item is typing.Any or _accepts(item, v) for v in value)
    return True


def check_fields(cls, values: dict, origin: str) -> dict:
    """Validate ``values`` against the fields of dataclass ``cls``; returns them unchanged."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"unknown key '{key}' in {origin}: valid keys are {', '.join(names)}")
        if not _accepts(hints[key], value):
            raise UserError(f"key '{key}' in {origin} has value {value!r}, which is not a {_type_name(hints[key])}")
    return values


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
