"""Help text that states each method's defaults as its config dataclass holds them, so the command line's help
never restates a number that could drift from the code."""

from __future__ import annotations

import dataclasses
from typing import Callable

_NO_DEFAULT = object()


def config_default(cls: type, option: str):
    """``option``'s default in the config ``cls``, or _NO_DEFAULT where the config has no such field. A field
    whose default depends on another field holds None and names its plain default as ``DEFAULT_<OPTION>``
    (a pruning config's sparsity: an N:M pattern implies its own)."""
    field = next((f for f in dataclasses.fields(cls) if f.name == option), None)
    if field is None:
        return _NO_DEFAULT
    value = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return getattr(cls, f"DEFAULT_{option.upper()}", value) if value is None else value


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def defaults_by_method(option: str, configs: dict[str, type], render: Callable[[object], str] = str) -> str:
    """'weighted for gptq and awq, none for rtn': each value ``option`` defaults to, with the methods whose
    configs hold it, in the table's order."""
    groups: dict[str, list[str]] = {}
    for method, cls in configs.items():
        value = config_default(cls, option)
        if value is not _NO_DEFAULT:
            groups.setdefault(render(value), []).append(method)
    if not groups:
        raise KeyError(f"no method config has the option {option!r}")
    return ", ".join(f"{value} for {_listed(methods)}" for value, methods in groups.items())


def method_choices(configs: dict[str, type], default: str) -> str:
    """'gptq (default), awq, rtn or bnb'."""
    names = [f"{name} (default)" if name == default else name for name in configs]
    return ", ".join(names[:-1]) + " or " + names[-1]
