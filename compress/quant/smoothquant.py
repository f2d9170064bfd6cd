"""SmoothQuant (Xiao et al., 2023): the activations' outlier channels moved into the weights before W8A8.

A few input channels of a layer carry activations far larger than the rest, so the one int8 scale a token gets
spends its range on them and rounds every other channel coarsely. SmoothQuant divides input channel j by
``s_j = max|X_j|^alpha / max|W[:, j]|^(1 - alpha)`` and multiplies the weights' column j by the same ``s_j``: the
product is unchanged, and the division costs nothing once folded into whatever produced the input (a norm's
weight, a preceding linear's rows). That is exactly AWQ's fold, so the producer search, the fold and the grid of
candidates are AWQ's (compress.quant.awq); only the statistics (maxima, not means) and what a candidate is scored
by differ. Per-channel weight scales take the larger columns in at 8 bits with little loss.

alpha: the paper fixes one per model (0.5 for most, up to 0.85 where outliers are heavier), llm-compressor takes
one strength for the model. Here, by default, it is searched per group of layers as AWQ searches its ratio: each
alpha on the grid, and no smoothing, is scored by the squared error of the group's outputs with both the weights
(per output channel) and the activations (per token) quantized, on up to ``SEARCH_TOKENS`` calibration tokens; the
best is folded. A strength given is used for every group unsearched. A group without an exact producer (GPT-NeoX's
fused attention output, o_proj under grouped-query attention) is quantized unsmoothed.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.block_inputs import BlockInputs
from compress.quant.awq import (Choice, GroupInputs, GroupScaling, candidate_scales, fake_quantize_weight, fold_groups,
                                search_ratio)
from compress.quant.config import N_GRID, WeightQuantConfig
from compress.quant.primitives import fake_quantize_tokens


def weight_max(weights: list[torch.Tensor]) -> torch.Tensor:
    """Per input channel: the largest |w| over the group's layers and rows."""
    return torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)


def quantized_output_error(x: torch.Tensor, weights: list[torch.Tensor], references: list[torch.Tensor],
                           scales: torch.Tensor | None, cfg: WeightQuantConfig) -> float:
    """Mean squared error of the layers' outputs on ``x`` (against ``references``, the float outputs) with the input
    divided and the weights' columns multiplied by ``scales`` (None: unsmoothed), then both quantized as the W8A8
    kernel runs them (weights by round-to-nearest, as the search's quantizer)."""
    xs = x if scales is None else x / scales
    xq = fake_quantize_tokens(xs, cfg.act_bits)
    total = 0.0
    for w, reference in zip(weights, references):
        ws = w.float() if scales is None else w.float() * scales
        wq = fake_quantize_weight(ws, cfg.bits, cfg.group_size, cfg.sym)
        total += float((reference - xq @ wq.t()).square().mean())
    return total


def smooth_block(block_name: str, block: nn.Module, linears: dict[str, nn.Linear], groups: list[list[str]],
                 inputs: BlockInputs, cfg: WeightQuantConfig, skip: set[str] = frozenset(),
                 n_grid: int = N_GRID) -> list[GroupScaling]:
    """Choose and fold the smoothing scales of each group of ``block`` (compress.quant.awq.fold_groups); ``ratio`` in
    each record is the alpha folded (None: not smoothed)."""
    def choose(_names: list[str], weights: list[torch.Tensor], seen: GroupInputs) -> Choice:
        device = weights[0].device
        x_max, w_max = seen.abs_max.to(device), weight_max(weights).to(device)
        if cfg.smoothing_strength is not None:
            return cfg.smoothing_strength, candidate_scales(x_max, w_max, cfg.smoothing_strength), None, None
        x = seen.sample.to(device)
        references = [x @ w.float().t() for w in weights]
        return search_ratio(lambda s: quantized_output_error(x, weights, references, s, cfg), x_max, w_max, n_grid)

    return fold_groups(block_name, block, linears, groups, inputs, choose, skip)
