"""Round-to-nearest (RTN): each group gets its grid (min/max, or searched) and every weight its nearest
code. Data-free unless the grid search is weighted by the calibration inputs."""

from __future__ import annotations

import torch

from compress.quant.config import RTNConfig, WeightQuantConfig  # noqa: F401 (re-exported)
from compress.quant.primitives import QuantizedWeight, default_g_idx, quantize_codes
from compress.quant.scale_search import choose_grid
from compress.registry import QuantMethod, register_method


def rtn_quantize(weight: torch.Tensor, cfg: WeightQuantConfig, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize ``weight`` [out, in] group by group along the input dimension (``hessian``: the layer's
    input Hessian, whose diagonal weights a ``weighted`` grid search)."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    step = in_features if cfg.group_size == -1 else cfg.group_size
    importance = torch.diagonal(hessian).float() if hessian is not None else None
    scales, zeros, codes = [], [], []
    for start in range(0, in_features, step):
        block = w[:, start:start + step]
        grid = choose_grid(block, cfg.bits, cfg.sym, cfg.scale_search,
                           importance[start:start + step] if importance is not None else None)
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
    summary = "round-to-nearest per group (data-free unless --scale-search weighted or --act-bits 8)"

    def needs_data(self, cfg: RTNConfig) -> bool:
        return cfg.scale_search == "weighted" or cfg.smooths

    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None, cfg: RTNConfig) -> QuantizedWeight:
        return rtn_quantize(weight, cfg, hessian)

    def prepare_block(self, block_name, block, linears, groups, inputs, cfg: RTNConfig, experts):
        from compress.quant.smoothquant_method import fold_smoothing

        return fold_smoothing(block_name, block, linears, groups, inputs, cfg, experts)
