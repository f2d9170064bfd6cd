"""``--method awq``: AWQ's scales folded into each block, then every layer rounded to its grid (RTN,
with the grid search the config names). ``--method gptq --awq`` folds the same scales before GPTQ."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.errors import UserError
from compress.quant.awq import N_GRID, GroupScaling, awq_prepare_block
from compress.quant.config import WeightQuantConfig
from compress.quant.primitives import QuantizedWeight
from compress.quant.rtn import rtn_quantize
from compress.registry import QuantMethod, register_method


@dataclass
class AWQConfig(WeightQuantConfig):
    sym: bool = False
    scale_search: str = "weighted"
    """AWQ's own clipping search, in the form every method here shares."""
    n_grid: int = N_GRID
    """Scale ratios tried per group of layers (0, 1/n_grid, ...)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_grid, int) or self.n_grid < 1:
            raise UserError(f"invalid n_grid {self.n_grid}: use a positive number of ratios to try, e.g. 20")


def fold_awq_scales(block_name, block, linears, groups, inputs, cfg: WeightQuantConfig,
                    experts: set[str], n_grid: int = N_GRID) -> list[GroupScaling]:
    return awq_prepare_block(block_name, block, linears, groups, inputs, cfg.bits, cfg.group_size, cfg.sym,
                             skip=experts, n_grid=n_grid)


@register_method
class AWQ(QuantMethod):
    name = "awq"
    config_cls = AWQConfig
    needs_calibration = True
    summary = "AWQ: activation-aware channel scales folded into the model, then round-to-nearest"

    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None, cfg: AWQConfig) -> QuantizedWeight:
        return rtn_quantize(weight, cfg, hessian)

    def prepare_block(self, block_name, block, linears, groups, inputs, cfg: AWQConfig, experts):
        return fold_awq_scales(block_name, block, linears, groups, inputs, cfg, experts, cfg.n_grid)
