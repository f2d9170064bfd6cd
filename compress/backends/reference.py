"""The reference backends: dense models through torch's F.linear, and GPTQ-format checkpoints through
our QuantLinear (unpack once, dequantize the whole weight per forward): exact and slow, the yardstick
the fast backends are checked against."""

from __future__ import annotations

import torch

from compress.backends import Backend, register_backend


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def gptq_summary(qcfg: dict, manifest: dict) -> dict:
    """bits / group_size / sym / desc_act / method / quantizer of a GPTQ-format checkpoint."""
    quantization = {k: qcfg.get(k) for k in ("bits", "group_size", "sym", "desc_act")}
    meta_method = (qcfg.get("meta") or {}).get("method")
    # A pruned-then-quantized checkpoint's manifest names the pruning method; config.json names both.
    quantization["method"] = (meta_method if manifest.get("kind") == "prune" else None) or manifest.get("method") \
        or meta_method or "gptq"
    quantization["quantizer"] = (qcfg.get("meta") or {}).get("quantizer")
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
    formats = ("gptq",)

    def load(self, resolved, qcfg, dtype, device, trust_remote_code):
        from compress.bench.load import LoadedModel
        from compress.checkpoint import load_quantized, read_manifest

        model, tokenizer = load_quantized(resolved.path, dtype)
        return LoadedModel(model, tokenizer, resolved, dtype, gptq_summary(qcfg, read_manifest(resolved.path) or {}),
                           f"compress QuantLinear: unpack once to uint8 codes, dequantize to {dtype_name(dtype)} "
                           "per forward, then F.linear", float(qcfg["bits"]), backend=self.name)
