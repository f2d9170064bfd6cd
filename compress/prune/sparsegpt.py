"""SparseGPT (Frantar & Alistarh, 2023): prune column by column and, like GPTQ, push each column's
error onto the columns not yet visited, weighted by the inverse Hessian of the layer's inputs (an
approximate Optimal Brain Surgeon update). The mask is chosen adaptively, a block of columns at a
time, by the OBS saliency w^2 / [H^-1]_jj^2 of the weights as updated so far.

``sparsegpt`` is the whole algorithm as a pure function of (W, H, settings). With a quantization
config it also quantizes the kept weights in the same pass (the paper's joint mode); with a fixed
mask it chooses nothing and only reconstructs, which is GPTQ that keeps a given sparsity pattern
(how magnitude and Wanda masks are quantized without losing their zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.errors import UserError
from compress.prune.config import SparseGPTConfig
from compress.prune.masks import Pattern, n_m_mask
from compress.quant.config import WeightQuantConfig
from compress.quant.gptq import inverse_hessian_factor
from compress.quant.primitives import QuantGrid, QuantizedWeight, default_g_idx, fake_quantize, find_grid, \
    quantize_codes
from compress.registry import PruneMethod, register_method


@dataclass
class SparseResult:
    weight: torch.Tensor
    """The new weight (dequantized when quantizing), zero where the mask is False."""
    mask: torch.Tensor
    quantized: QuantizedWeight | None = None


def _block_mask(saliency: torch.Tensor, remove: int) -> torch.Tensor:
    """Keep-mask of a block: the ``remove`` lowest saliencies across the whole block go."""
    mask = torch.ones_like(saliency, dtype=torch.bool)
    if remove:
        lowest = torch.topk(saliency.flatten(), remove, largest=False).indices
        mask.view(-1)[lowest] = False
    return mask


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Pattern = Pattern(),
              damp_percent: float = 0.01, block_size: int = 128, quant: WeightQuantConfig | None = None,
              fixed_mask: torch.Tensor | None = None) -> SparseResult:
    """Prune ``weight`` [out, in] to ``sparsity`` given the input Hessian [in, in].

    Unstructured: each block of columns loses its share of the layer's quota (cumulative rounding, so
    the layer loses exactly floor(sparsity * numel) weights). N:M: every M columns the N-of-M mask is
    chosen by saliency. ``quant`` quantizes the kept weights in the same pass (per-group grids fixed
    when a group's first column comes up, as in GPTQ without act-order).
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float()  # read only: inverse_hessian_factor makes its own copy
    rows, cols = w.shape
    if pattern.structured and cols % pattern.m:
        raise UserError(f"{pattern} sparsity needs the input width ({cols}) to be a multiple of {pattern.m}")
    if fixed_mask is not None:
        w = w * fixed_mask
    dead = torch.diag(h) == 0  # inputs never active: their weights go, their diagonal counts as 1
    w[:, dead] = 0
    h_inv = inverse_hessian_factor(h, damp_percent)

    mask = torch.ones_like(w, dtype=torch.bool) if fixed_mask is None else fixed_mask.clone().bool()
    group_size = cols if quant is None or quant.group_size == -1 else quant.group_size
    codes = torch.zeros_like(w, dtype=torch.int32) if quant is not None else None
    scales, zeros = [], []
    grid: QuantGrid | None = None
    removed = 0
    for b1 in range(0, cols, block_size):
        b2 = min(b1 + block_size, cols)
        w_blk = w[:, b1:b2].clone()
        err_blk = torch.zeros_like(w_blk)
        h_inv_blk = h_inv[b1:b2, b1:b2]
        d = torch.diag(h_inv_blk)
        if fixed_mask is None and not pattern.structured:
            quota = int(sparsity * (rows * b2)) - removed
            mask[:, b1:b2] = _block_mask(w_blk.pow(2) / d.pow(2)[None, :], quota)
            removed += quota
        for i in range(b2 - b1):
            col = b1 + i
            if fixed_mask is None and pattern.structured and i % pattern.m == 0:
                saliency = w_blk[:, i:i + pattern.m].pow(2) / d[i:i + pattern.m].pow(2)[None, :]
                mask[:, col:col + pattern.m] = n_m_mask(saliency, pattern)
            column = w_blk[:, i] * mask[:, col]
            if quant is not None:
                if col % group_size == 0:
                    ahead = torch.cat([w_blk[:, i:], w[:, b2:]], dim=1)[:, :group_size]
                    grid = find_grid(ahead * mask[:, col:col + ahead.shape[1]], quant.bits, quant.sym)
                    scales.append(grid.scale)
                    zeros.append(grid.zero)
                codes[:, col] = quantize_codes(column, grid.scale, grid.zero, quant.bits).to(torch.int32)
                column = fake_quantize(column, grid.scale, grid.zero, quant.bits)
            err = (w_blk[:, i] - column) / h_inv_blk[i, i]
            w_blk[:, i:] -= err.unsqueeze(1) @ h_inv_blk[i, i:].unsqueeze(0)
            w_blk[:, i] = column
            err_blk[:, i] = err
        w[:, b1:b2] = w_blk
        w[:, b2:] -= err_blk @ h_inv[b1:b2, b2:]

    w = w * mask  # exact zeros (a quantized zero is exact already; this guards the float path)
    quantized = None
    if quant is not None:
        quantized = QuantizedWeight(codes=codes, scale=torch.stack(scales), zero=torch.stack(zeros),
                                    g_idx=default_g_idx(cols, quant.group_size, w.device), bits=quant.bits)
    return SparseResult(w.to(weight.dtype), mask, quantized)


@register_method
class SparseGPT(PruneMethod):
    name = "sparsegpt"
    config_cls = SparseGPTConfig
    needs_calibration = True
    summary = "SparseGPT: OBS reconstruction with the inverse Hessian, shared with GPTQ (needs calibration data)"

    def prune_weight(self, weight, hessian, cfg: SparseGPTConfig):
        assert hessian is not None, "SparseGPT needs the layer's input Hessian"
        result = sparsegpt(weight, hessian, cfg.sparsity, cfg.parsed_pattern, cfg.damp_percent, cfg.block_size)
        return result.weight, result.mask

    def prune_and_quantize(self, weight, hessian, cfg: SparseGPTConfig, quant: WeightQuantConfig) -> SparseResult:
        """The paper's joint mode: one pass chooses the mask and quantizes what is kept."""
        return sparsegpt(weight, hessian, cfg.sparsity, cfg.parsed_pattern, cfg.damp_percent, cfg.block_size, quant)
