"""The reference backends: dense models through torch's F.linear, and GPTQ-format checkpoints through
our QuantLinear (unpack once, dequantize the whole weight per forward): exact and slow, the yardstick
the fast backends are checked against."""

from __future__ import annotations

import torch

from compress.backends import Backend, register_backend
from compress.formats import PACKED_METHODS, packed_settings


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def gptq_summary(qcfg: dict, manifest: dict) -> dict:
    """bits / group_size / sym / desc_act / method / quantizer / format of a packed (GPTQ or compressed-tensors)
    checkpoint."""
    settings = packed_settings(qcfg)
    quantization = {"bits": settings.bits, "group_size": settings.group_size, "sym": settings.sym,
                    "desc_act": settings.act_order, "format": settings.format}
    if settings.act_bits:
        quantization["act_bits"] = settings.act_bits
    meta_method = settings.method
    # A pruned-then-quantized checkpoint's manifest names the pruning method; config.json names both.
    quantization["method"] = (meta_method if manifest.get("kind") == "prune" else None) or manifest.get("method") \
        or meta_method or "gptq"
    quantization["quantizer"] = settings.quantizer
    if manifest.get("lm_head"):
        head = manifest["lm_head"]
        quantization["lm_head"] = {k: head[k] for k in ("bits", "group_size", "method", "tied_embedding")}
    return quantization


@register_backend
class Dense(Backend):
    name = "dense"
    summary = "torch F.linear on float weights"
    formats = ("dense",)

    def load(self, resolved, qcfg, dtype, device, trust_remote_code):
        from compress.bench.load import LoadedModel
        from compress.models import load_model

        model, tokenizer = load_model(resolved.path, dtype, trust_remote_code)
        return LoadedModel(model, tokenizer, resolved, dtype, None, f"torch dense {dtype_name(dtype)} F.linear",
                           float(torch.finfo(dtype).bits), backend=self.name)


@register_backend
class Dequant(Backend):
    name = "dequant"
    summary = "our QuantLinear: unpack once to uint8 codes, dequantize the whole weight per forward, F.linear"
    formats = PACKED_METHODS

    def load(self, resolved, qcfg, dtype, device, trust_remote_code):
        from compress.bench.load import LoadedModel
        from compress.checkpoint import load_quantized, read_manifest

        model, tokenizer = load_quantized(resolved.path, dtype)
        return LoadedModel(model, tokenizer, resolved, dtype, gptq_summary(qcfg, read_manifest(resolved.path) or {}),
                           f"compress QuantLinear: unpack once to uint8 codes, dequantize to {dtype_name(dtype)} "
                           "per forward, then F.linear", float(packed_settings(qcfg).bits), backend=self.name)
