"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

``gptq_quantize`` is the whole algorithm as a pure function of (W, H, config); the calibration
driver supplies H = 2/n * sum(x x^T) over the layer's calibration inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.errors import UserError
from compress.quant.config import WeightQuantConfig
from compress.quant.primitives import QuantGrid, QuantizedWeight, fake_quantize, find_grid, quantize_codes
from compress.registry import QuantMethod, register_method


@dataclass
class GPTQConfig(WeightQuantConfig):
    damp_percent: float = 0.01
    """Dampening added to the Hessian diagonal, as a fraction of its mean."""
    act_order: bool = True
    """Quantize columns in order of decreasing Hessian diagonal (desc_act)."""
    static_groups: bool = False
    """With act_order: fix each group's grid from the original weights before any update."""
    block_size: int = 128
    """Columns updated together (lazy batch updates); changes speed, not results."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hessian_settings(self.damp_percent, self.block_size)


def check_hessian_settings(damp_percent: float, block_size: int) -> None:
    """The settings every inverse-Hessian method shares (GPTQ, SparseGPT)."""
    if not 0 < damp_percent < 1:
        raise UserError(f"invalid damp_percent {damp_percent}: use a fraction between 0 and 1, e.g. 0.01")
    if block_size <= 0:
        raise UserError(f"invalid block_size {block_size}: use a positive number of columns, e.g. 128")


def inverse_hessian_factor(hessian: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after dampening (GPTQ's numerically stable formulation)."""
    h = hessian.clone()
    cols = h.shape[0]
    damp = damp_percent * torch.mean(torch.diag(h))
    h[range(cols), range(cols)] += damp
    lower = torch.linalg.cholesky(h)
    h_inv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(h_inv, upper=True)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, cfg: GPTQConfig) -> QuantizedWeight:
    """Quantize ``weight`` [out, in] given the input Hessian [in, in]."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    out_features, cols = w.shape
    group_size = cols if cfg.group_size == -1 else cfg.group_size

    # Inputs that were always zero carry no information: pin their weights to zero.
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    static_grids: list[QuantGrid] | None = None
    if cfg.static_groups:
        static_grids = [find_grid(w[:, g:g + group_size], cfg.bits, cfg.sym) for g in range(0, cols, group_size)]

    perm = torch.arange(cols, device=w.device)
    if cfg.act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    inv_perm = torch.argsort(perm)

    h_inv = inverse_hessian_factor(h, cfg.damp_percent)
    codes = torch.zeros_like(w)
    col_scale = torch.zeros_like(w)
    col_zero = torch.zeros_like(w)
    grid: QuantGrid | None = None

    for b1 in range(0, cols, cfg.block_size):
        b2 = min(b1 + cfg.block_size, cols)
        w_blk = w[:, b1:b2].clone()
        err_blk = torch.zeros_like(w_blk)
        h_inv_blk = h_inv[b1:b2, b1:b2]
        for i in range(b2 - b1):
            col = b1 + i
            if static_grids is not None:
                grid = static_grids[int(perm[col]) // group_size]
            elif col % group_size == 0:
                # The grid of a group is fixed when its first column comes up, from the weights as
                # updated so far (in act-order this groups columns by their permuted position).
                grid = find_grid(torch.cat([w_blk[:, i:], w[:, b2:]], dim=1)[:, :group_size], cfg.bits, cfg.sym)
            column = w_blk[:, i]
            q = quantize_codes(column, grid.scale, grid.zero, cfg.bits)
            dq = fake_quantize(column, grid.scale, grid.zero, cfg.bits)
            codes[:, col], col_scale[:, col], col_zero[:, col] = q, grid.scale, grid.zero
            err = (column - dq) / h_inv_blk[i, i]
            w_blk[:, i:] -= err.unsqueeze(1) @ h_inv_blk[i, i:].unsqueeze(0)
            err_blk[:, i] = err
        w[:, b2:] -= err_blk @ h_inv[b1:b2, b2:]

    codes = codes[:, inv_perm]
    col_scale = col_scale[:, inv_perm]
    col_zero = col_zero[:, inv_perm]
    # Group index of each original column: its position in quantization order // group size
    # (identity without act-order; its original group with static groups).
    if cfg.static_groups or not cfg.act_order:
        g_idx = torch.arange(cols, device=w.device) // group_size
    else:
        g_idx = inv_perm // group_size
    n_groups = -(-cols // group_size)
    scale = torch.zeros(n_groups, out_features, device=w.device)
    zero = torch.zeros(n_groups, out_features, device=w.device)
    # Every column of a group shares the group's grid: take it from any member column.
    scale[g_idx] = col_scale.t()
    zero[g_idx] = col_zero.t()
    return QuantizedWeight(codes=codes.to(torch.int32), scale=scale, zero=zero, g_idx=g_idx.to(torch.int32),
                           bits=cfg.bits)


@register_method
class GPTQ(QuantMethod):
    name = "gptq"
    config_cls = GPTQConfig
    needs_calibration = True
    summary = "GPTQ: Hessian-aware rounding with error propagation (needs calibration data)"

    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None, cfg: GPTQConfig) -> QuantizedWeight:
        assert hessian is not None, "GPTQ needs the layer's input Hessian"
        return gptq_quantize(weight, hessian, cfg)
