"""Wanda (Sun et al., 2023): score each weight by |W_ij| * ||X_j||_2 and remove the lowest scores within
each output row. No weight update, one forward pass of calibration data.

The input norms come from the Hessian the shared driver already collects: H = 2/n * sum(x x^T), so
diag(H) is proportional to ||X_j||^2, and the constant factor changes no comparison.
"""

from __future__ import annotations

import torch

from compress.prune.config import WandaConfig
from compress.prune.masks import make_mask, wanda_scores
from compress.registry import PruneMethod, register_method


def input_norms_from_hessian(hessian: torch.Tensor) -> torch.Tensor:
    """Per-input-feature L2 norms over the calibration tokens, up to one constant factor."""
    return torch.diag(hessian).clamp(min=0).sqrt()


def wanda_prune(weight: torch.Tensor, input_norms: torch.Tensor, cfg: WandaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    mask = make_mask(wanda_scores(weight.float(), input_norms.float()), cfg.sparsity, cfg.parsed_pattern,
                     cfg.comparison)
    return weight * mask, mask


@register_method
class Wanda(PruneMethod):
    name = "wanda"
    config_cls = WandaConfig
    needs_calibration = True
    summary = "Wanda: |W| x input-activation norm per output row (needs calibration data)"

    def prune_weight(self, weight, hessian, cfg: WandaConfig):
        assert hessian is not None, "Wanda needs the layer's input statistics"
        return wanda_prune(weight, input_norms_from_hessian(hessian), cfg)
