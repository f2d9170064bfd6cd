"""Load any model the benchmark is pointed at, and say how it computes.

A folder with a GPTQ ``quantization_config`` runs on our QuantLinear (the same loader whatever tool
wrote the folder, so every GPTQ row is measured the same way); anything else loads dense in the
requested dtype. An optional transform (a peer's in-memory scheme, e.g. torchao int8) is applied
after loading. The returned description names the kernel that really runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.errors import UserError
from compress.models import ResolvedModel, load_model, resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_BITS = {torch.float32: 32, torch.bfloat16: 16, torch.float16: 16}


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    resolved: ResolvedModel
    dtype: torch.dtype
    quantization: dict | None
    """bits / group_size / sym / desc_act / method of a quantized checkpoint, else None."""
    kernel: str
    weight_bits: float
    """Nominal bits of the compressed linear weights (the dtype's bits for a dense model)."""
    notes: list[str] = field(default_factory=list)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}': choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _quantization_config(path: Path) -> dict | None:
    config = json.loads((path / "config.json").read_text())
    return config.get("quantization_config")


def load_for_bench(reference: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False,
                   transform: str | None = None) -> LoadedModel:
    resolved = resolve(reference, trust_remote_code)
    qcfg = _quantization_config(resolved.path)
    if qcfg is not None:
        if qcfg.get("quant_method") != "gptq":
            raise UserError(f"{reference} is quantized with {qcfg.get('quant_method')!r}; the benchmark reads dense "
                            "models and GPTQ-format checkpoints")
        from compress.checkpoint import load_quantized, read_manifest

        model, tokenizer = load_quantized(resolved.path, dtype)
        manifest = read_manifest(resolved.path) or {}
        quantization = {k: qcfg.get(k) for k in ("bits", "group_size", "sym", "desc_act")}
        meta_method = (qcfg.get("meta") or {}).get("method")
        # A pruned-then-quantized checkpoint's manifest names the pruning method; config.json names both.
        quantization["method"] = (meta_method if manifest.get("kind") == "prune" else None) or manifest.get("method") \
            or meta_method or "gptq"
        quantization["quantizer"] = (qcfg.get("meta") or {}).get("quantizer")
        loaded = LoadedModel(model, tokenizer, resolved, dtype, quantization,
                             f"compress QuantLinear: unpack once to uint8 codes, dequantize to {_name(dtype)} "
                             "per forward, then F.linear", float(qcfg["bits"]))
    else:
        model, tokenizer = load_model(resolved.path, dtype, trust_remote_code)
        loaded = LoadedModel(model, tokenizer, resolved, dtype, None, f"torch dense {_name(dtype)} F.linear",
                             float(DTYPE_BITS[dtype]))
    note = pruning_note(resolved.path)
    if note:
        loaded.notes.append(note)
    if transform:
        from compress.peers import get_transform

        get_transform(transform).apply(loaded)
    loaded.model.to(device)
    loaded.model.eval()
    return loaded


def pruning_note(path: Path) -> str | None:
    """What `compress prune` did to this model, from its manifest (None for a model it did not make)."""
    from compress.checkpoint import read_manifest

    manifest = read_manifest(path) or {}
    if manifest.get("kind") != "prune":
        return None
    structure = manifest.get("structure")
    if structure:
        where = "in the model" if structure["target"] == "layers" else "per block"
        return (f"structured pruning ({structure['target']}): {structure['units_before']} -> "
                f"{structure['units_after']} {structure['unit']} {where}, a smaller dense model")
    pattern = manifest["config"].get("pattern", "unstructured")
    return (f"{manifest['method']} pruning ({pattern}): {manifest['sparsity']['overall']:.1%} of the pruned layers' "
            "weights are zero, stored dense (no sparse kernel: zeros cost the same time and memory)")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
