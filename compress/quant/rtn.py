"""Round-to-nearest (RTN): the data-free baseline. Each group gets a min/max grid; no calibration."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.quant.config import WeightQuantConfig
from compress.quant.primitives import QuantizedWeight, default_g_idx, find_grid, quantize_codes
from compress.registry import QuantMethod, register_method


@dataclass
class RTNConfig(WeightQuantConfig):
    pass


def rtn_quantize(weight: torch.Tensor, cfg: WeightQuantConfig) -> QuantizedWeight:
    """Quantize ``weight`` [out, in] group by group along the input dimension."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    step = in_features if cfg.group_size == -1 else cfg.group_size
    scales, zeros, codes = [], [], []
    for start in range(0, in_features, step):
        block = w[:, start:start + step]
        grid = find_grid(block, cfg.bits, cfg.sym)
        codes.append(quantize_codes(block, grid.scale[:, None], grid.zero[:, None], cfg.bits))
        scales.append(grid.scale)
        zeros.append(grid.zero)
    return QuantizedWeight(
        codes=torch.cat(codes, dim=1).to(torch.int32),
        scale=torch.stack(scales),
        zero=torch.stack(zeros),
        g_idx=default_g_idx(in_features, cfg.group_size, weight.device),
        bits=cfg.bits,
    )


@register_method
class RTN(QuantMethod):
    name = "rtn"
    config_cls = RTNConfig
    needs_calibration = False
    summary = "round-to-nearest per group (data-free baseline)"

    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None, cfg: RTNConfig) -> QuantizedWeight:
        return rtn_quantize(weight, cfg)
