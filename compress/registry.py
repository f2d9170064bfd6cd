"""The method registry: name -> method plugin. Built-ins register on import; third parties through
the ``compress.methods`` entry-point group (each entry point names a module or a QuantMethod class)."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import ClassVar

import torch

from compress.errors import UserError

ENTRY_POINT_GROUP = "compress.methods"
_BUILTIN_MODULES = ("compress.quant.rtn", "compress.quant.gptq")

METHODS: dict[str, "QuantMethod"] = {}
_loaded = False


class QuantMethod:
    """A weight-quantization method: turns one linear weight (plus, if it observes data, the Hessian
    of that layer's inputs) into a QuantizedWeight. The shared calibration driver does the rest."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    needs_calibration: ClassVar[bool]
    summary: ClassVar[str] = ""

    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None, cfg):  # pragma: no cover
        raise NotImplementedError


def register_method(cls: type[QuantMethod]) -> type[QuantMethod]:
    METHODS[cls.name] = cls()
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()  # importing the module registers it; a class is registered here
        if isinstance(obj, type) and issubclass(obj, QuantMethod) and obj.name not in METHODS:
            register_method(obj)


def available_methods() -> dict[str, QuantMethod]:
    _load_all()
    return dict(METHODS)


def get_method(name: str) -> QuantMethod:
    methods = available_methods()
    if name not in methods:
        raise UserError(f"unknown method '{name}': choose one of {', '.join(sorted(methods))}")
    return methods[name]
