"""The method registries: name -> plugin, one table for quantization methods and one for pruning
methods. Built-ins register on import; third parties through the ``compress.methods`` entry-point
group (each entry point names a module, or a QuantMethod or PruneMethod class)."""

from __future__ import annotations

import dataclasses
import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, ClassVar

from compress.errors import UserError

if TYPE_CHECKING:  # the method modules import torch; naming and checking a method does not
    import torch

ENTRY_POINT_GROUP = "compress.methods"
BUILTIN_QUANT = {"rtn": "compress.quant.rtn", "gptq": "compress.quant.gptq", "awq": "compress.quant.awq_method",
                 "smoothquant": "compress.quant.smoothquant_method", "fp8": "compress.quant.fp8_method", "bnb": "compress.quant.bnb"}
BUILTIN_PRUNE = {"magnitude": "compress.prune.magnitude", "wanda": "compress.prune.wanda",
                 "sparsegpt": "compress.prune.sparsegpt", "structured": "compress.prune.structured"}
"""Built-in method name -> the module that registers it (a test checks the names against the classes)."""
_BUILTIN_MODULES = (*BUILTIN_QUANT.values(), *BUILTIN_PRUNE.values())

METHODS: dict[str, "QuantMethod"] = {}
PRUNE_METHODS: dict[str, "PruneMethod"] = {}
_loaded = False


class QuantMethod:
    """A weight-quantization method: turns one linear weight (plus, if it observes data, the Hessian
    of that layer's inputs) into a QuantizedWeight. The shared calibration driver does the rest."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    needs_calibration: ClassVar[bool]
    summary: ClassVar[str] = ""
    writes_own_checkpoint: ClassVar[bool] = False
    """A method that quantizes whole models through another library (bitsandbytes) implements
    ``quantize_checkpoint(request, cfg) -> QuantizeResult`` instead of ``quantize_weight``."""

    def needs_data(self, cfg) -> bool:
        """Whether a run with ``cfg`` observes calibration data (a data-free method may need it for some
        settings: RTN with a weighted scale search)."""
        return self.needs_calibration

    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None, cfg):  # pragma: no cover
        raise NotImplementedError

    def prepare_block(self, block_name: str, block, linears: dict, groups: list[list[str]], inputs, cfg,
                      experts: set[str]) -> list | None:
        """Runs on each block, with data, before its layers are observed; may change the block's float
        weights without changing its function (AWQ's scales). Returns records for the manifest."""
        return None


class PruneMethod:
    """A pruning method. Weight methods (magnitude, Wanda, SparseGPT) implement ``prune_weight`` and
    run on the shared layer-by-layer driver; a method that changes the model's shape (structured)
    overrides ``apply`` instead. ``compress.prune.apply`` holds the glue."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    needs_calibration: ClassVar[bool]
    summary: ClassVar[str] = ""
    patterns: ClassVar[tuple[str, ...]] = ("unstructured", "N:M")
    """Sparsity patterns the method can produce."""
    changes_shape: ClassVar[bool] = False
    """True for a method that rebuilds the model (structured): it needs the whole model in memory and
    overrides ``apply``; weight methods stream through the shared driver block by block."""

    def prune_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None, cfg):  # pragma: no cover
        """-> (new weight with the removed entries at zero, keep-mask)."""
        raise NotImplementedError

    def prune_and_quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None, cfg, quant):
        """A joint prune-and-quantize mode (SparseGPT's) -> a SparseResult, or None for a method that has none:
        then its mask is followed by GPTQ that keeps the mask (compress.prune.apply.prune_and_quantize)."""
        return None

    def apply(self, model, cfg, windows, device, selection, quant=None, show_progress: bool = True):
        """-> (pruned model, PruneStats). Weight methods change ``model`` in place and return it."""
        from compress.prune.apply import prune_layerwise

        return model, prune_layerwise(model, self, cfg, windows, device, selection, quant, show_progress)


def register_method(cls: type) -> type:
    table = PRUNE_METHODS if issubclass(cls, PruneMethod) else METHODS
    table[cls.name] = cls()
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
        if isinstance(obj, type) and issubclass(obj, (QuantMethod, PruneMethod)) \
                and obj.name not in METHODS and obj.name not in PRUNE_METHODS:
            register_method(obj)


def available_methods() -> dict[str, QuantMethod]:
    _load_all()
    return dict(METHODS)


def get_method(name: str) -> QuantMethod:
    methods = available_methods()
    if name not in methods:
        raise UserError(_unknown("method", name, methods))
    return methods[name]


def available_prune_methods() -> dict[str, PruneMethod]:
    _load_all()
    return dict(PRUNE_METHODS)


def get_prune_method(name: str) -> PruneMethod:
    methods = available_prune_methods()
    if name not in methods:
        raise UserError(_unknown("pruning method", name, methods))
    return methods[name]


def _plugin_names() -> set[str]:
    """Entry-point names of third-party methods (the name a plugin registers under), without loading them."""
    return {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}


def check_method_name(name: str) -> None:
    """get_method's error for an unknown name, without importing any method (or torch) unless plugins are
    installed (one may register under another name than its entry point's: then the full lookup decides)."""
    _check_name(name, BUILTIN_QUANT, get_method, "method")


def check_prune_method_name(name: str) -> None:
    _check_name(name, BUILTIN_PRUNE, get_prune_method, "pruning method")


def _check_name(name: str, builtin: dict[str, str], lookup, what: str) -> None:
    if name in builtin:
        return
    if _plugin_names():
        lookup(name)
        return
    raise UserError(_unknown(what, name, builtin))


def config_fields(method) -> set[str]:
    """The settings a method's config dataclass holds (its options; their defaults are the dataclass's)."""
    return {f.name for f in dataclasses.fields(method.config_cls)}


def _unknown(what: str, name: str, names) -> str:
    return f"unknown {what} '{name}': choose one of {', '.join(sorted(names))}"
