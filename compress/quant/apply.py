"""Glue: run a quantization method over a model's blocks with the shared driver, swap each block's
linear layers for packed QuantLinear modules and hand the finished block on (to be written). The model
is changed in place; the caller opened a private copy."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.blocks import BlockSource
from compress.driver import DriverPlan, DriverReport, run_layerwise
from compress.quant.awq import GroupScaling
from compress.quant.config import WeightQuantConfig
from compress.quant.linear import QuantLinear
from compress.quant.mixed import LayerOption
from compress.quant.primitives import QuantizedWeight
from compress.quant.rtn import rtn_quantize
from compress.registry import QuantMethod
from compress.select import ModuleSelection, block_linears, set_submodule


@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, int]
    proxy_loss: float | None
    """tr(dW H dW^T) / out_features: the layer's mean squared output error on the calibration inputs."""
    damp_percent: float | None = None
    """The dampening GPTQ had to raise this layer's Hessian to (None: the configured one worked)."""
    fallback: str | None = None
    """Set when a calibrated method could not calibrate this layer (an expert too few tokens reached)
    and its data-free rule was used instead, e.g. "rtn"."""


@dataclass
class QuantizeStats:
    layers: list[LayerRecord] = field(default_factory=list)
    block_prefix: str = ""
    """Module path of the transformer blocks, e.g. model.layers."""
    scalings: list[GroupScaling] = field(default_factory=list)
    """AWQ: per group of layers, the producer its scales were folded into and the ratio chosen."""

    @property
    def quantized_names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def output_error(weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared layer-output error implied by a weight change, from the input Hessian."""
    delta = (weight.float() - new_weight.float())
    return float((delta @ hessian * delta).sum() / weight.shape[0] / 2)


def quantize_model(source: "BlockSource | nn.Module", method: QuantMethod, cfg: WeightQuantConfig,
                   windows: list[torch.Tensor] | None, device: torch.device, selection: ModuleSelection | None = None,
                   show_progress: bool = True, emit: Callable[[str, nn.Module], None] | None = None,
                   plan: DriverPlan | None = None, report: DriverReport | None = None, stats: QuantizeStats | None = None,
                   overrides: dict[str, LayerOption] | None = None, layout: str | None = None) -> QuantizeStats:
    """Quantize every selected layer; ``emit(block_name, block)`` receives each block once it is packed.
    ``stats`` carries the records of blocks an interrupted run already did; ``overrides`` gives layers
    (by qualified name) bits and group sizes of their own (mixed precision); ``layout`` is the packed layers'
    layout (compress.quant.layouts; default: the method's GPTQ one)."""
    selection = selection or ModuleSelection()
    stats = stats or QuantizeStats()
    pending: dict[str, QuantizedWeight] = {}
    needs_data = method.needs_data(cfg)
    overrides = overrides or {}
    layer_configs: dict[LayerOption, WeightQuantConfig] = {}

    def cfg_for(name: str) -> WeightQuantConfig:
        option = overrides.get(name)
        if option is None or (option.bits, option.group_size) == (cfg.bits, cfg.group_size):
            return cfg
        if option not in layer_configs:
            layer_configs[option] = dataclasses.replace(cfg, bits=option.bits, group_size=option.group_size)
        return layer_configs[option]

    def quantize_layer(name: str, layer: nn.Linear, hessian: torch.Tensor | None) -> torch.Tensor | None:
        shape = tuple(layer.weight.shape)
        layer_cfg = cfg_for(name)
        if not needs_data:  # data-free: nothing runs this block again before it is packed
            pending[name] = method.quantize_weight(layer.weight.data, None, layer_cfg)
            stats.layers.append(LayerRecord(name, shape, None))
            return None
        if hessian is None:  # an expert too few calibration tokens reached: the data-free rule
            pending[name] = qw = rtn_quantize(layer.weight.data, layer_cfg)
            stats.layers.append(LayerRecord(name, shape, None, fallback="rtn"))
            return qw.dequantize()
        pending[name] = qw = method.quantize_weight(layer.weight.data, hessian, layer_cfg)
        new_weight = qw.dequantize()
        stats.layers.append(LayerRecord(name, shape, output_error(layer.weight.data, new_weight, hessian),
                                        damp_percent=qw.damp_percent))
        if qw.damp_percent is not None:
            # Said once per layer, above the progress bar: the run goes on with the stronger dampening.
            tqdm.write(f"{name}: input Hessian not positive definite at damp_percent {cfg.damp_percent:g}; "
                       f"used {qw.damp_percent:g}", file=sys.stderr)
        return new_weight

    def pack_block(block_name: str, block: nn.Module) -> None:
        for name, layer in block_linears(block, selection).items():
            qualified = f"{block_name}.{name}"
            qw = pending.pop(qualified)
            packed = QuantLinear.from_quantized(qw, cfg_for(qualified).group_size, layer.bias,
                                                layout or cfg.checkpoint_format, sym=cfg.sym, act_bits=cfg.act_bits)
            set_submodule(block, name, packed.to(layer.weight.device))
        if emit is not None:
            emit(block_name, block)

    def prepare_block(block_name: str, block: nn.Module, linears: dict, groups: list[list[str]], inputs,
                      experts: set[str]) -> None:
        stats.scalings.extend(method.prepare_block(block_name, block, linears, groups, inputs, cfg, experts) or [])

    if needs_data and not windows:
        raise ValueError(f"{method.name} needs calibration windows")
    stats.block_prefix = run_layerwise(source, windows if needs_data else None, quantize_layer,
                                       selection, device, pack_block, desc=f"{method.name} w{cfg.bits}",
                                       show_progress=show_progress, plan=plan, report=report,
                                       prepare_block=prepare_block)
    return stats
