"""Pure pruning-mask math: scores in, a keep-mask out. No modules, no hooks, testable on a matrix.

Conventions (those of the Wanda and SparseGPT papers):
* a weight is [out_features, in_features]; a mask is True where the weight is KEPT;
* ``sparsity`` is the fraction of weights removed, in [0, 1);
* ``N:M`` keeps N weights in every M consecutive input weights of a row (2:4 removes 2 of every 4);
* unstructured masks compare scores within each output row ('row', Wanda's choice) or across the
  whole layer ('layer', the classic magnitude baseline).
"""

from __future__ import annotations

import torch

from compress.errors import UserError
from compress.prune.config import COMPARISONS, Pattern, check_sparsity, parse_pattern  # noqa: F401 (re-exported)


def unstructured_mask(scores: torch.Tensor, sparsity: float, comparison: str = "row") -> torch.Tensor:
    """Remove the ``sparsity`` fraction of lowest-scoring weights (exactly floor(sparsity * count) per
    row or per layer; ties are broken by position so the count is exact)."""
    check_sparsity(sparsity)
    if comparison not in COMPARISONS:
        raise ValueError(f"comparison must be one of {COMPARISONS}, not {comparison!r}")
    flat = scores.reshape(1, -1) if comparison == "layer" else scores
    remove = int(flat.shape[1] * sparsity)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if remove:
        lowest = torch.topk(flat.float(), remove, dim=1, largest=False).indices
        mask.scatter_(1, lowest, False)
    return mask.reshape(scores.shape)


def n_m_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep the ``pattern.n`` highest scores in every group of ``pattern.m`` consecutive input weights."""
    rows, columns = scores.shape
    if columns % pattern.m:
        raise UserError(f"{pattern} sparsity needs the input width ({columns}) to be a multiple of {pattern.m}")
    groups = scores.float().reshape(rows, columns // pattern.m, pattern.m)
    lowest = torch.topk(groups, pattern.m - pattern.n, dim=2, largest=False).indices
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, lowest, False)
    return mask.reshape(rows, columns)


def make_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern, comparison: str = "row") -> torch.Tensor:
    return n_m_mask(scores, pattern) if pattern.structured else unstructured_mask(scores, sparsity, comparison)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|: the data-free baseline."""
    return weight.abs()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (Sun et al. 2023): a weight matters as much as the inputs it multiplies.
    ``input_norms`` [in_features] are the L2 norms of each input feature over the calibration tokens."""
    if input_norms.shape != (weight.shape[1],):
        raise ValueError(f"input norms of shape {tuple(input_norms.shape)} do not match {weight.shape[1]} inputs")
    return weight.abs() * input_norms.to(weight.dtype)[None, :]


def sparsity_of(mask: torch.Tensor) -> float:
    return 1 - mask.float().mean().item()
