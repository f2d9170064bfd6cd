"""Dataclasses <-> plain JSON values, strictly: the reader refuses what the types do not describe.

Writing is ``dataclasses.asdict``. Reading walks the dataclass's type hints: a nested dataclass is read from an
object, ``list[X]`` from an array, ``X | None`` from null or X, ``dict`` fields are taken as they are, and a
float field takes a JSON integer. An unknown key, a missing key without a default, or a value of the wrong
type raises ``RecordError`` naming its path (``speed.decode[1].batch``), so a damaged or foreign file is
said, not half-read.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class RecordError(ValueError):
    """A JSON value that does not match the record type it is read as."""


def to_plain(record) -> dict:
    return dataclasses.asdict(record)


def from_plain(cls: type[T], value: Any, where: str = "") -> T:
    return _read(cls, value, where or cls.__name__)


@typing.no_type_check
def _read(kind, value, where: str):
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _read(option, value, where)
            except RecordError as exc:
                errors.append(str(exc))
        raise RecordError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {kind}")
    if dataclasses.is_dataclass(kind):
        return _read_dataclass(kind, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise RecordError(f"{where}: expected a list, found {type(value).__name__}")
        (item,) = typing.get_args(kind) or (Any,)
        return [_read(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, found {type(value).__name__}")
        return value
    if kind is Any:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (str, int, float, bool):
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise RecordError(f"{where}: expected {kind.__name__}, found {type(value).__name__} {value!r}"[:200])
        return value
    raise TypeError(f"{where}: no JSON reading for type {kind!r}")


def _read_dataclass(cls, value, where: str):
    if not isinstance(value, dict):
        raise RecordError(f"{where}: expected an object, found {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise RecordError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    values = {}
    for name, f in fields.items():
        if name in value:
            values[name] = _read(hints[name], value[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecordError(f"{where}: missing field {name}")
    return cls(**values)
