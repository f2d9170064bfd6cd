"""The fast CPU path for our GPTQ/RTN checkpoints: every packed layer that torch has a fused low-bit
matmul for is swapped for one (4-bit: int4pack, 8-bit with one scale per row: int8pack), in
bfloat16, the dtype those kernels are fast in. Layers no kernel fits (3 bits, grouped 8 bits) stay on
the dequantizing reference layer, and the result says how many and why."""

from __future__ import annotations

from collections import Counter

import torch

from compress.backends import Backend, register_backend
from compress.backends.packing import NotPackable
from compress.backends.reference import dtype_name, gptq_summary
from compress.backends.torch_kernels import Int4PackedLinear, Int8PackedLinear
from compress.formats import PACKED_METHODS, activations_refusal, packed_settings
from compress.quant.head import QuantEmbedding
from compress.quant.linear import QuantLinear
from compress.select import set_submodule

KERNELS = {4: Int4PackedLinear, 8: Int8PackedLinear}


def fast_layer(layer: QuantLinear, dtype: torch.dtype, needs_rows: bool):
    """The fused-kernel layer for ``layer``, or the reason there is none."""
    kernel = KERNELS.get(layer.bits)
    if kernel is None:
        return None, f"{layer.bits}-bit weights have no fused torch kernel"
    if needs_rows and not hasattr(kernel, "embedding_rows"):
        return None, f"a tied embedding reads its rows, which the {kernel.kernel} layout does not give"
    try:
        return kernel(layer, dtype), None
    except NotPackable as exc:
        return None, str(exc)


def convert(model, dtype: torch.dtype) -> tuple[Counter, dict[str, str]]:
    """Swap every QuantLinear that a kernel fits, in place; (kernel counts, {layer: why not}).

    Layers are looked up by name one at a time, so a replaced layer's packed tensors are freed as soon as
    its kernel layer exists: holding the old layers until the end doubled the peak (7B: 7.7 GiB for 3.9 GB).
    """
    embeddings = [m for m in model.modules() if isinstance(m, QuantEmbedding)]
    used, kept = Counter(), {}
    for name in [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
        layer = model.get_submodule(name)
        readers = [e for e in embeddings if e.source is layer]
        new, why = fast_layer(layer, dtype, needs_rows=bool(readers))
        if new is None:
            kept[name] = why
            continue
        set_submodule(model, name, new)
        for embedding in readers:
            embedding.retarget(new)
        del layer, readers
        used[f"{new.kernel} ({new.bits}-bit)"] += 1
    return used, kept


def kernel_description(used: Counter, kept: dict[str, str], dtype: torch.dtype) -> str:
    parts = [f"torch {kernel} x{count}" for kernel, count in sorted(used.items())]
    if kept:
        parts.append(f"dequantizing QuantLinear x{len(kept)}")
    return f"{' + '.join(parts)}; activations {dtype_name(dtype)}"


@register_backend
class TorchKernels(Backend):
    name = "torch"
    summary = "torch's fused CPU matmuls: int4pack (4-bit, any group, act-order) and int8pack (8-bit per channel)"
    formats = PACKED_METHODS
    devices = ("cpu",)

    def preferred_dtype(self, qcfg, device):
        return torch.bfloat16

    def unsupported(self, qcfg, device, dtype):
        if dtype is not None and dtype != torch.bfloat16:
            return f"computes in bfloat16 (its kernels are slow in {dtype_name(dtype)}): use --dtype bfloat16 or auto"
        refusal = activations_refusal(qcfg, "torch's weight-only int4/int8 kernels",
                                      "use --backend dequant (exact) or vllm")
        if refusal:
            return refusal
        settings = packed_settings(qcfg)
        bits = set(settings.all_bits)
        if not bits & set(KERNELS):
            return f"no fused torch kernel for {'/'.join(map(str, sorted(bits)))}-bit weights (4 and 8 have one)"
        if bits == {8} and settings.group_size != -1:
            return "torch's int8 matmul takes one scale per output row; this checkpoint has groups of " \
                   f"{settings.group_size} (quantize with --group-size -1)"
        return None

    def load(self, resolved, qcfg, dtype, device, trust_remote_code):
        from compress.bench.load import LoadedModel
        from compress.checkpoint import load_quantized, read_manifest

        model, tokenizer = load_quantized(resolved.path, dtype)
        used, kept = convert(model, dtype)
        loaded = LoadedModel(model, tokenizer, resolved, dtype, gptq_summary(qcfg, read_manifest(resolved.path) or {}),
                             kernel_description(used, kept, dtype), float(packed_settings(qcfg).bits), backend=self.name)
        for why in sorted(set(kept.values())):
            names = [n for n, w in kept.items() if w == why]
            loaded.notes.append(f"{len(names)} layer(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) "
                                f"run on the dequantizing reference layer: {why}")
        return loaded
