"""Glue: run a weight-pruning method over a model with the shared layer-by-layer driver (the one GPTQ
uses), optionally quantizing what is kept in the same pass. The model is changed in place; the caller
loaded a private copy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from compress.blocks import BlockSource
from compress.driver import DriverPlan, DriverReport, run_layerwise
from compress.prune.masks import magnitude_scores, make_mask, sparsity_of
from compress.quant.apply import output_error
from compress.prune.config import KeptWeightsQuantConfig
from compress.quant.linear import QuantLinear
from compress.quant.primitives import QuantizedWeight
from compress.quant.rtn import rtn_quantize
from compress.registry import PruneMethod
from compress.select import ModuleSelection, block_linears, set_submodule


@dataclass
class PrunedLayer:
    name: str
    shape: tuple[int, int]
    sparsity: float
    """Fraction of the layer's weights that are zero after pruning."""
    output_error: float | None
    """tr(dW H dW^T) / out_features: the layer's mean squared output error on the calibration inputs."""
    fallback: str | None = None
    """Set when the layer could not be calibrated (an expert too few tokens reached) and the data-free
    rule pruned it instead: "magnitude" (and RTN for the kept weights when quantizing)."""


@dataclass
class PruneStats:
    layers: list[PrunedLayer] = field(default_factory=list)
    block_prefix: str = ""
    quantized: bool = False
    """True when the kept weights were quantized too (the model now holds QuantLinear layers)."""
    structure: dict = field(default_factory=dict)
    """Structured pruning: what was removed, per block."""


def prune_and_quantize(method: PruneMethod, weight: torch.Tensor, hessian: torch.Tensor | None, cfg,
                       quant: KeptWeightsQuantConfig) -> tuple[torch.Tensor, torch.Tensor, QuantizedWeight]:
    """Prune, then quantize the kept weights without losing a zero: the method's joint mode where it has
    one (SparseGPT), else its mask followed by GPTQ that keeps the mask (RTN when there is no data)."""
    from compress.prune.sparsegpt import sparsegpt

    joint = method.prune_and_quantize(weight, hessian, cfg, quant)
    if joint is not None:
        return joint.weight, joint.mask, joint.quantized
    pruned, mask = method.prune_weight(weight, hessian, cfg)
    if hessian is None:
        qw = rtn_quantize(pruned, quant)
        return qw.dequantize().to(weight.dtype), mask, qw
    result = sparsegpt(pruned, hessian, cfg.sparsity, fixed_mask=mask, quant=quant, damp_percent=quant.damp_percent)
    return result.weight, mask, result.quantized


def prune_layerwise(source: "BlockSource | nn.Module", method: PruneMethod, cfg, windows: list[torch.Tensor] | None,
                    device: torch.device, selection: ModuleSelection | None = None,
                    quant: KeptWeightsQuantConfig | None = None, show_progress: bool = True,
                    emit: Callable[[str, nn.Module], None] | None = None, plan: DriverPlan | None = None,
                    report: DriverReport | None = None, stats: PruneStats | None = None) -> PruneStats:
    """Prune every selected layer; ``emit(block_name, block)`` receives each finished block. ``stats``
    carries the records of blocks an interrupted run already did."""
    selection = selection or ModuleSelection()
    stats = stats or PruneStats()
    stats.quantized = quant is not None
    pending: dict[str, QuantizedWeight] = {}

    def prune_layer(name: str, layer: nn.Linear, hessian: torch.Tensor | None) -> torch.Tensor:
        weight = layer.weight.data
        fallback = None
        if hessian is None and needs_data:  # an expert too few calibration tokens reached: the data-free rule
            mask = make_mask(magnitude_scores(weight), cfg.sparsity, cfg.parsed_pattern, getattr(cfg, "comparison",
                                                                                                   "row"))
            new_weight, fallback = weight * mask, "magnitude"
            if quant is not None:
                pending[name] = qw = rtn_quantize(new_weight, quant)
                new_weight, fallback = qw.dequantize().to(weight.dtype), "magnitude+rtn"
        elif quant is None:
            new_weight, mask = method.prune_weight(weight, hessian, cfg)
        else:
            new_weight, mask, pending[name] = prune_and_quantize(method, weight, hessian, cfg, quant)
        loss = output_error(weight, new_weight, hessian) if hessian is not None else None
        stats.layers.append(PrunedLayer(name, tuple(weight.shape), round(sparsity_of(new_weight != 0), 6), loss,
                                        fallback))
        return new_weight

    def pack_block(block_name: str, block: nn.Module) -> None:
        if quant is not None:
            for name, layer in block_linears(block, selection).items():
                packed = QuantLinear.from_quantized(pending.pop(f"{block_name}.{name}"), quant.group_size, layer.bias,
                                                   quant.checkpoint_format, sym=quant.sym)
                set_submodule(block, name, packed.to(layer.weight.device))
        if emit is not None:
            emit(block_name, block)

    needs_data = method.needs_calibration or quant is not None
    if needs_data and not windows:
        raise ValueError(f"{method.name} needs calibration windows")
    tag = f"{method.name} {cfg.tag}" + (f"+w{quant.bits}" if quant else "")
    stats.block_prefix = run_layerwise(source, windows if needs_data else None, prune_layer, selection, device,
                                       pack_block, desc=tag, show_progress=show_progress, plan=plan, report=report)
    return stats
