"""``--method smoothquant``: SmoothQuant's smoothing folded into each block, then W8A8: weights rounded to 8 bits per
output channel, activations quantized per token as the kernel runs. ``--act-bits 8`` gives rtn and gptq the same
smoothing and activations (gptq then rounds the weights)."""

from __future__ import annotations

from compress.quant.config import SmoothQuantConfig
from compress.quant.rtn import RTN
from compress.registry import register_method


def fold_smoothing(block_name, block, linears, groups, inputs, cfg, experts):
    """The prepare-block step of every W8A8 method (None where the config does not smooth)."""
    if not cfg.smooths:
        return None
    from compress.quant.smoothquant import smooth_block

    return smooth_block(block_name, block, linears, groups, inputs, cfg, skip=experts)


@register_method
class SmoothQuant(RTN):
    name = "smoothquant"
    config_cls = SmoothQuantConfig
    summary = "SmoothQuant W8A8: activation outliers folded into the weights, int8 weights and per-token activations"
