"""Measure each layer's sensitivity to each quantization option once, for the mixed-precision choice
(``compress.quant.mixed``): a pass over the blocks with the float model's calibration activations, in
which every layer in turn is quantized alone (round-to-nearest with min/max grids: fast, and what
matters is the order of the layers, not GPTQ's absolute error) and its block's output error measured."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Hashable

import torch
from torch import nn

from compress.blocks import BlockSource
from compress.driver import DriverPlan, run_layerwise
from compress.limits import DEFAULT_ACTIVATION_BUDGET
from compress.quant.awq import fake_quantize_weight
from compress.quant.mixed import LayerCost
from compress.select import ModuleSelection

SENSITIVITY_WINDOWS = 8
"""Calibration windows whose block output each (layer, option) is measured on: one block pass each."""


FakeQuantize = Callable[[torch.Tensor, Hashable], torch.Tensor]
"""(weight, option) -> the weight as the option would store it (dequantized)."""


def grid_option(sym: bool) -> FakeQuantize:
    """Round-to-nearest on min/max grids at the option's bits and group size (LayerOption)."""
    return lambda weight, option: fake_quantize_weight(weight, option.bits, option.group_size, sym)


@torch.no_grad()
def block_sensitivities(block_name: str, block: nn.Module, linears: dict[str, nn.Linear], inputs,
                        options: "list[Hashable] | Callable[[nn.Linear], list[Hashable]]",
                        fake: FakeQuantize) -> list[LayerCost]:
    """Each layer's block-output error under each option (``options``: a list, or a layer's own list)."""
    windows = range(min(SENSITIVITY_WINDOWS, len(inputs.hidden)))
    reference = [inputs.call(block, i) for i in windows]
    costs = []
    for name, layer in linears.items():
        original = layer.weight.data
        losses = {}
        for option in (options(layer) if callable(options) else options):
            layer.weight.data = fake(original, option).to(original.dtype)
            losses[option] = sum(float((inputs.call(block, i).float() - ref.float()).square().mean())
                                 for i, ref in zip(windows, reference)) / len(reference)
        layer.weight.data = original
        costs.append(LayerCost(f"{block_name}.{name}", tuple(layer.weight.shape), losses))
    return costs


def measure_sensitivities(source: "BlockSource | nn.Module", windows: list[torch.Tensor],
                          options: "list[Hashable] | Callable[[nn.Linear], list[Hashable]]",
                          fake: FakeQuantize, selection: ModuleSelection, device: torch.device,
                          show_progress: bool = True, spill_folder: Path | None = None,
                          activation_budget: int = DEFAULT_ACTIVATION_BUDGET) -> list[LayerCost]:
    """Every selected layer's block-output error under each option, the rest of the model in float. The
    blocks are read and run as they are (streaming: one at a time) and left unchanged. Only the windows
    that are measured are carried through the blocks (each window's states depend on it alone), within
    ``activation_budget`` bytes in memory and beyond it in ``spill_folder``, like any other pass."""
    costs: list[LayerCost] = []
    windows = windows[:SENSITIVITY_WINDOWS]
    plan = DriverPlan(spill_folder=spill_folder, activation_budget=activation_budget)

    def measure(block_name, block, linears, _groups, inputs, _experts) -> None:
        costs.extend(block_sensitivities(block_name, block, linears, inputs, options, fake))

    run_layerwise(source, windows, lambda name, layer, hessian: layer.weight.data, selection, device,
                  lambda _name, _block: None, desc="sensitivity", show_progress=show_progress,
                  prepare_block=measure, observe=False, plan=plan)
    return costs
