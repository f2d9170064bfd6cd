"""Magnitude pruning: remove the smallest |W|. The data-free baseline of the Wanda and SparseGPT papers,
which compare across the whole layer, so that is the default here too."""

from __future__ import annotations

import torch

from compress.prune.config import MagnitudeConfig
from compress.prune.masks import magnitude_scores, make_mask
from compress.registry import PruneMethod, register_method


def magnitude_prune(weight: torch.Tensor, cfg: MagnitudeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    mask = make_mask(magnitude_scores(weight), cfg.sparsity, cfg.parsed_pattern, cfg.comparison)
    return weight * mask, mask


@register_method
class Magnitude(PruneMethod):
    name = "magnitude"
    config_cls = MagnitudeConfig
    needs_calibration = False
    summary = "remove the smallest |W| (data-free baseline)"

    def prune_weight(self, weight, hessian, cfg: MagnitudeConfig):
        return magnitude_prune(weight, cfg)
