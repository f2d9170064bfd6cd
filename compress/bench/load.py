"""Load any model the benchmark is pointed at, and say how it computes.

The checkpoint's format (dense, GPTQ, bitsandbytes) and ``--backend`` choose a backend
(compress.backends): ``auto`` is the fastest one that can run it on the device (our GPTQ checkpoints:
torch's fused int4/int8 kernels on the CPU), a named one runs or fails with the reason. An optional
transform (a peer's in-memory scheme, e.g. torchao int8) is applied after loading. The returned
description names the kernel that really runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.errors import UserError
from compress.models import ResolvedModel, resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    backend: str = "dense"
    """The backend that loaded it (compress.backends)."""
    threads: dict[str, int] = field(default_factory=dict)
    """Thread pools of a backend that runs its own (onnxruntime's intra/inter-op), beside torch's."""


def resolve_dtype(name: str, device: torch.device, preferred: torch.dtype | None = None) -> torch.dtype:
    """``auto`` is the backend's preferred dtype where it has one, else float32 on CPU, float16 on CUDA."""
    if name == "auto":
        return preferred or (torch.float32 if device.type == "cpu" else torch.float16)
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}': choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _quantization_config(path: Path) -> dict | None:
    if path.is_file():  # a GGUF file: its types are read by the llamacpp backend
        return None
    config = json.loads((path / "config.json").read_text())
    return config.get("quantization_config")


def choose_for(reference: str, dtype: str | torch.dtype, device: torch.device, trust_remote_code: bool = False,
               backend: str = "auto"):
    """(resolved model, its quantization_config, backend, dtype, what auto passed over), from the
    folder's config and tensor headers alone: cheap, so a backend that cannot run the model, or weights it would
    misread, fail before any work."""
    from compress.backends import choose_backend

    resolved = resolve(reference, trust_remote_code, allow_gguf=True)
    qcfg = _quantization_config(resolved.path)
    from compress.models import ONNX_MODEL_FILE, is_gguf, refuse_quantized_source

    onnx, gguf_file = (resolved.path / ONNX_MODEL_FILE).is_file(), is_gguf(resolved.path)
    if qcfg is None and not (onnx or gguf_file):
        from compress.shards import ShardReader

        # Quantized tensors that the config does not describe (FP8 without its scales) read as floats would be
        # silent garbage: refused here, before any work.
        refuse_quantized_source(reference, ShardReader(resolved.path),
                                "its config.json does not say how to read them: bench its float original, or a "
                                "checkpoint whose quantization_config names its format")
    pinned = dtype if isinstance(dtype, torch.dtype) else None if dtype == "auto" else resolve_dtype(dtype, device)
    chosen, passed_over = choose_backend(backend, qcfg, device, pinned, onnx=onnx, gguf=gguf_file)
    return resolved, qcfg, chosen, pinned or resolve_dtype("auto", device, chosen.preferred_dtype(qcfg, device)), \
        passed_over


def load_for_bench(reference: str, dtype: str | torch.dtype, device: torch.device, trust_remote_code: bool = False,
                   transform: str | None = None, backend: str = "auto") -> LoadedModel:
    resolved, qcfg, chosen, dtype, passed_over = choose_for(reference, dtype, device, trust_remote_code, backend)
    loaded = chosen.load(resolved, qcfg, dtype, device, trust_remote_code)
    for reason in passed_over:
        loaded.notes.append(f"backend auto passed over {reason}")
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
