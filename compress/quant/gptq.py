"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

``gptq_quantize`` is the whole algorithm as a pure function of (W, H, config); the calibration
driver supplies H = 2/n * sum(x x^T) over the layer's calibration inputs.
"""

from __future__ import annotations

from typing import Callable

import torch

from compress.errors import UserError
from compress.quant.config import GPTQConfig, WeightQuantConfig, check_hessian_settings  # noqa: F401 (re-exported)
from compress.quant.primitives import QuantGrid, QuantizedWeight, quantize_codes
from compress.quant.scale_search import choose_grid
from compress.registry import QuantMethod, register_method


def upper_triangular_inverse(upper: torch.Tensor, base: int = 256) -> torch.Tensor:
    """Inverse of an upper-triangular matrix by halves: inv([[A, B], [0, C]]) = [[A', -A' B C'], [0, C']],
    the corner as two triangular solves. About three times faster here than one triangular solve
    against the identity, which costs n^3 where a triangular inverse needs n^3/3."""
    out = torch.zeros_like(upper)
    _invert_into(upper, out, base)
    return out


def _invert_into(upper: torch.Tensor, out: torch.Tensor, base: int) -> None:
    n = upper.shape[0]
    if n <= base:
        out.copy_(torch.linalg.solve_triangular(upper, torch.eye(n, dtype=upper.dtype, device=upper.device),
                                                upper=True))
        return
    k = n // 2
    _invert_into(upper[:k, :k], out[:k, :k], base)
    _invert_into(upper[k:, k:], out[k:, k:], base)
    a_inv_b = torch.linalg.solve_triangular(upper[:k, :k], upper[:k, k:], upper=True)
    out[:k, k:] = torch.linalg.solve_triangular(upper[k:, k:], a_inv_b, upper=True, left=False).neg_()


class HessianNotPositiveDefinite(UserError):
    pass


MAX_DAMP_PERCENT = 0.5
"""The most dampening a retry may reach; past it the layer's Hessian is unusable and the run stops."""


def inverse_hessian_factor(hessian: torch.Tensor, damp_percent: float, order: torch.Tensor | None = None,
                           on_retry: Callable[[float], None] | None = None) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U) after dampening: GPTQ's numerically stable form.
    ``order`` permutes H's inputs first (act-order); an input that was never active (zero diagonal) gets
    a diagonal of 1. ``hessian`` itself is left as it is.

    With J the order-reversing permutation and J H J = L L^T, H = (J L J)(J L J)^T where J L J is upper
    triangular, so U = (J L J)^-1: one Cholesky and one triangular inverse, instead of a Cholesky, a full
    inverse and a second Cholesky (the cost that dominates GPTQ on wide layers: 11008 inputs in a 7B MLP).
    The permuted, reversed copy is made in one gather, and each matrix is dropped as soon as the next
    exists: at most three n x n matrices besides ``hessian`` (for the 7B down projection, 485 MB each).

    A Hessian that is not positive definite after dampening (few calibration tokens, inputs that are
    nearly collinear, half-precision activations) is dampened ten times more, up to MAX_DAMP_PERCENT of
    its mean diagonal, as GPTQModel does; ``on_retry(damp_percent)`` hears of each new value.
    """
    cols = hessian.shape[0]
    reverse = torch.arange(cols - 1, -1, -1, device=hessian.device) if order is None else order.flip(0)
    flipped = hessian[reverse[:, None], reverse]  # J P H P^T J
    diagonal = torch.diagonal(flipped)
    diagonal[diagonal == 0] = 1
    mean = torch.mean(diagonal.flip(0))  # summed in H's (permuted) order, as always
    diagonal += damp_percent * mean
    while True:
        lower, info = torch.linalg.cholesky_ex(flipped)
        if int(info) == 0:
            break
        del lower
        if damp_percent >= MAX_DAMP_PERCENT:
            raise HessianNotPositiveDefinite(
                f"a layer's input Hessian is not positive definite even with damp_percent {damp_percent:g}: "
                "calibrate with more samples (--nsamples)")
        raised = min(damp_percent * 10, MAX_DAMP_PERCENT)
        diagonal += (raised - damp_percent) * mean
        damp_percent = raised
        if on_retry is not None:
            on_retry(damp_percent)
    del flipped, diagonal
    upper = torch.flip(lower, (0, 1))
    del lower
    return upper_triangular_inverse(upper)


def group_aware_order(diagonal: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group-aware reordering (GAR): whole groups of contiguous columns, the group whose most important column
    (largest Hessian diagonal) is largest first (ties in column order), each group's columns by decreasing
    importance; a partial last group comes last. Returns the columns in quantization order."""
    cols = diagonal.numel()
    full = cols - cols % group_size
    grouped = diagonal[:full].view(-1, group_size)
    within = torch.argsort(grouped, dim=1, descending=True, stable=True)
    groups = torch.argsort(grouped.max(dim=1).values, descending=True, stable=True)
    starts = torch.arange(0, full, group_size, device=diagonal.device)[:, None]
    tail = full + torch.argsort(diagonal[full:], descending=True, stable=True)
    return torch.cat([(within + starts)[groups].reshape(-1), tail])


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, cfg: GPTQConfig) -> QuantizedWeight:
    """Quantize ``weight`` [out, in] given the input Hessian [in, in].

    The work is done on the transpose (one row per input column), so every column GPTQ visits, rounds
    and updates is contiguous in memory; codes are kept as one byte each and each group's grid once,
    never a full-size float buffer per column.
    """
    out_features, cols = weight.shape
    group_size = cols if cfg.group_size == -1 else cfg.group_size
    wt = weight.detach().float().t().contiguous()  # [in, out]: row c is input column c
    h = hessian.detach().float()  # read, never copied whole: inverse_hessian_factor permutes it

    # Inputs that were always zero carry no information: pin their weights to zero (their Hessian
    # diagonal counts as 1).
    diagonal = torch.diag(h)
    dead = diagonal == 0
    diagonal[dead] = 1
    wt[dead] = 0

    group_aware = cfg.act_order and cfg.group_aware
    static_grids: list[QuantGrid] | None = None
    if cfg.static_groups and cfg.act_order:  # without act order every group is its own columns anyway
        static_grids = [choose_grid(wt[g:g + group_size].t(), cfg.bits, cfg.sym, cfg.scale_search,
                                    diagonal[g:g + group_size]) for g in range(0, cols, group_size)]

    perm = torch.arange(cols, device=wt.device)
    if cfg.act_order:
        perm = group_aware_order(diagonal, group_size) if group_aware else torch.argsort(diagonal, descending=True)
        wt = wt[perm]
    importance = diagonal[perm]  # per quantization position: what a weighted grid search weighs by
    inv_perm = torch.argsort(perm)

    damp_used: list[float] = []
    h_inv = inverse_hessian_factor(h, cfg.damp_percent, perm if cfg.act_order else None, damp_used.append)
    codes = torch.empty(cols, out_features, dtype=torch.uint8, device=wt.device)
    grids: list[QuantGrid] = []  # by group of quantization positions (position // group_size)
    grid: QuantGrid | None = None

    for b1 in range(0, cols, cfg.block_size):
        b2 = min(b1 + cfg.block_size, cols)
        w_blk = wt[b1:b2]  # a view: the block's updates land in wt
        err_blk = torch.empty_like(w_blk)
        h_inv_blk = h_inv[b1:b2, b1:b2]
        for i in range(b2 - b1):
            col = b1 + i
            if static_grids is not None:
                grid = static_grids[int(perm[col]) // group_size]
            elif col % group_size == 0:
                # The grid of a group is fixed when its first column comes up, from the weights as
                # updated so far (in act-order this groups columns by their permuted position). The
                # group's later columns in this block are up to date; those past it get the block's
                # update first, as they would have by now.
                end = min(col + group_size, cols)
                group = wt[col:end].clone()
                if end > b2:
                    group[b2 - col:] -= h_inv[b1:col, b2:end].t() @ err_blk[:i]
                grid = choose_grid(group.t(), cfg.bits, cfg.sym, cfg.scale_search, importance[col:end])
                grids.append(grid)
            column = w_blk[i]
            q = quantize_codes(column, grid.scale, grid.zero, cfg.bits)
            codes[col] = q.to(torch.uint8)
            err = (column - grid.scale * (q - grid.zero)) / h_inv_blk[i, i]
            w_blk[i:].addr_(h_inv_blk[i, i:], err, alpha=-1)
            err_blk[i] = err
        wt[b2:].addmm_(h_inv[b1:b2, b2:].t(), err_blk, alpha=-1)

    codes = codes[inv_perm].t().to(torch.int32)
    # Group index of each original column: its position in quantization order // group size
    # (identity without act-order; its original group with static groups).
    if static_grids is not None or not cfg.act_order or group_aware:
        g_idx = torch.arange(cols, device=wt.device) // group_size
    else:
        g_idx = inv_perm // group_size
    chosen = static_grids if static_grids is not None else grids
    if group_aware and static_grids is None:  # made in visiting order: the k-th group starts at perm[k * size]
        visited = [int(perm[k * group_size]) // group_size for k in range(len(grids))]
        chosen = [grids[k] for k in sorted(range(len(grids)), key=visited.__getitem__)]
    scale = torch.stack([g.scale for g in chosen])
    zero = torch.stack([g.zero for g in chosen])
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, g_idx=g_idx.to(torch.int32), bits=cfg.bits,
                           damp_percent=damp_used[-1] if damp_used else None)


@register_method
class GPTQ(QuantMethod):
    name = "gptq"
    config_cls = GPTQConfig
    needs_calibration = True
    summary = "GPTQ: Hessian-aware rounding with error propagation (needs calibration data)"

    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None, cfg: GPTQConfig) -> QuantizedWeight:
        assert hessian is not None, "GPTQ needs the layer's input Hessian"
        return gptq_quantize(weight, hessian, cfg)

    def prepare_block(self, block_name, block, linears, groups, inputs, cfg: GPTQConfig, experts):
        if cfg.smooths:
            from compress.quant.smoothquant_method import fold_smoothing

            return fold_smoothing(block_name, block, linears, groups, inputs, cfg, experts)
        if not cfg.awq:
            return None
        from compress.quant.awq_method import fold_awq_scales  # the AWQ method module registers itself

        return fold_awq_scales(block_name, block, linears, groups, inputs, cfg, experts)
