"""Scale search: each group's clipping range chosen to minimise its quantization error, instead of
its min/max.

A min/max grid spends its steps on the group's largest weight; clipping the range a little (shrinking
it by a factor p < 1) rounds the bulk of the weights more finely at the cost of clipping the few at
the edge, and usually lowers the error. For each row of a group the search tries shrink factors from
1 (min/max itself, so the result is never worse than min/max on the measure searched) down to
``1 - MAX_SHRINK`` in steps of 1/GRID, as GPTQModel's and llm-compressor's MSE observers do, and keeps
the best per row. The measure is the squared error of each weight (``mse``), or that error weighted
by the mean square of the input that multiplies the weight (``weighted``: the diagonal of the layer's
input Hessian, as llama.cpp's imatrix and llm-compressor's imatrix observer do), which is the layer's
output error when inputs are uncorrelated.
"""

from __future__ import annotations

import torch

from compress.quant.choices import SCALE_SEARCHES  # noqa: F401  (re-exported)
from compress.quant.primitives import QuantGrid, fake_quantize, find_grid, grid_from_range

GRID = 100
MAX_SHRINK = 0.8
PATIENCE = 10
"""Candidates in a row without any row improving after which the search stops early (llm-compressor
stops on the same rule): the error is close to unimodal in p, so later candidates rarely win."""


def grid_error(w: torch.Tensor, grid: QuantGrid, bits: int, importance: torch.Tensor | None) -> torch.Tensor:
    """Per-row squared error of ``w`` [rows, cols] on ``grid``, weighted per column by ``importance``."""
    err = (fake_quantize(w, grid.scale[:, None], grid.zero[:, None], bits) - w).square_()
    if importance is not None:
        err.mul_(importance)
    return err.sum(dim=1)


def search_grid(w: torch.Tensor, bits: int, sym: bool, importance: torch.Tensor | None = None) -> QuantGrid:
    """The grid per row of ``w`` [rows, cols] with the least (``importance``-weighted) squared error
    among shrunk min/max ranges; ``importance`` [cols] is non-negative (None: every column counts 1)."""
    w = w.float()
    if importance is not None:
        importance = importance.float().to(w.device)
    low, high = w.min(dim=1).values, w.max(dim=1).values
    best = grid_from_range(low, high, bits, sym)
    best_err = grid_error(w, best, bits, importance)
    since_improved = 0
    for step in range(1, int(MAX_SHRINK * GRID)):
        p = 1 - step / GRID
        grid = grid_from_range(low * p, high * p, bits, sym)
        err = grid_error(w, grid, bits, importance)
        better = err < best_err
        if better.any():
            since_improved = 0
            best_err = torch.where(better, err, best_err)
            best = QuantGrid(scale=torch.where(better, grid.scale, best.scale),
                             zero=torch.where(better, grid.zero, best.zero))
        else:
            since_improved += 1
            if since_improved >= PATIENCE:
                break
    return best


def choose_grid(w: torch.Tensor, bits: int, sym: bool, search: str,
                importance: torch.Tensor | None = None) -> QuantGrid:
    """The grid for one group ``w`` [rows, cols] under a config's ``scale_search``. ``weighted`` uses
    ``importance`` (the input Hessian's diagonal over the group's columns) and falls back to plain
    ``mse`` where a layer has none (an expert no calibration token reached, quantized data-free)."""
    if search == "none":
        return find_grid(w, bits, sym)
    return search_grid(w, bits, sym, importance if search == "weighted" else None)
