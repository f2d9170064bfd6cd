"""Glue: run a quantization method over a model with the shared driver and swap its linear layers
for packed QuantLinear modules. The model is changed in place; the caller loaded a private copy."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compress.calibrate import run_layerwise
from compress.quant.config import WeightQuantConfig
from compress.quant.linear import QuantLinear
from compress.quant.primitives import QuantizedWeight
from compress.registry import QuantMethod
from compress.select import ModuleSelection, block_linears, set_submodule


@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, int]
    proxy_loss: float | None
    """tr(dW H dW^T) / out_features: the layer's mean squared output error on the calibration inputs."""


@dataclass
class QuantizeStats:
    layers: list[LayerRecord] = field(default_factory=list)
    block_prefix: str = ""
    """Module path of the transformer blocks, e.g. model.layers."""

    @property
    def quantized_names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def output_error(weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared layer-output error implied by a weight change, from the input Hessian."""
    delta = (weight.float() - new_weight.float())
    return float((delta @ hessian * delta).sum() / weight.shape[0] / 2)


def quantize_model(model: nn.Module, method: QuantMethod, cfg: WeightQuantConfig, windows: list[torch.Tensor] | None,
                   device: torch.device, selection: ModuleSelection | None = None,
                   show_progress: bool = True) -> QuantizeStats:
    selection = selection or ModuleSelection()
    stats = QuantizeStats()
    pending: dict[str, QuantizedWeight] = {}

    def quantize_layer(name: str, layer: nn.Linear, hessian: torch.Tensor | None) -> torch.Tensor:
        qw = method.quantize_weight(layer.weight.data, hessian, cfg)
        new_weight = qw.dequantize()
        loss = output_error(layer.weight.data, new_weight, hessian) if hessian is not None else None
        stats.layers.append(LayerRecord(name, tuple(layer.weight.shape), loss))
        pending[name] = qw
        return new_weight

    def pack_block(block_name: str, block: nn.Module) -> None:
        for name, layer in block_linears(block, selection).items():
            qw = pending.pop(f"{block_name}.{name}")
            packed = QuantLinear.from_quantized(qw, cfg.group_size, layer.bias)
            set_submodule(block, name, packed.to(layer.weight.device))

    if method.needs_calibration and not windows:
        raise ValueError(f"{method.name} needs calibration windows")
    stats.block_prefix = run_layerwise(model, windows if method.needs_calibration else None, quantize_layer, selection, device,
                  pack_block, desc=f"{method.name} w{cfg.bits}", show_progress=show_progress)
    return stats
