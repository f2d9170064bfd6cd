"""``--method fp8``: FP8 W8A8, dynamic. Every linear weight becomes E4M3 values with one scale per output channel;
the activations are rounded to E4M3 per token by the kernel as it runs (vLLM's FP8 paths on GPUs; our loader does the
same rounding). Data-free, written as compressed-tensors float-quantized."""

from __future__ import annotations

import torch

from compress.quant.config import Fp8Config
from compress.quant.primitives import QuantizedWeight, fp8_quantize
from compress.registry import QuantMethod, register_method


@register_method
class FP8(QuantMethod):
    name = "fp8"
    config_cls = Fp8Config
    needs_calibration = False
    summary = "FP8 W8A8 dynamic: E4M3 weights per channel, E4M3 activations per token (data-free)"

    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None, cfg: Fp8Config) -> QuantizedWeight:
        return fp8_quantize(weight)
