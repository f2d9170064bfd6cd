"""``--method awq``: AWQ's scales folded into each block, then every layer rounded to its grid (RTN,
with the grid search the config names). ``--method gptq --awq`` folds the same scales before GPTQ."""

from __future__ import annotations

import torch

from compress.quant.awq import GroupScaling, awq_prepare_block
from compress.quant.config import N_GRID, AWQConfig, WeightQuantConfig
from compress.quant.primitives import QuantizedWeight
from compress.quant.rtn import rtn_quantize
from compress.registry import QuantMethod, register_method


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
