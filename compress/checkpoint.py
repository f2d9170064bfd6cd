"""Quantized checkpoints: a Hugging Face folder in the standard GPTQ layout, and our own loader.

The folder holds config.json with a ``quantization_config`` block (quant_method gptq), safetensors
weights where every quantized linear is stored as qweight/qzeros/scales/g_idx (checkpoint_format
"gptq", zero points minus one), the tokenizer, and ``compress_manifest.json`` recording how it was
made. transformers loads it with GPTQModel + optimum installed; ``load_quantized`` runs it without
them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.errors import UserError
from compress.fsutil import atomic_folder
from compress.models import auto_class, check_checkpoint, quiet_transformers
from compress.quant.config import WeightQuantConfig
from compress.quant.head import QuantEmbedding, dynamic_override, float_copies_for_save, layer_settings, module_name
from compress.quant.linear import QuantLinear
from compress.select import set_submodule

MANIFEST_NAME = "compress_manifest.json"
QUANTIZED_SUFFIX = ".qweight"
PACKED_PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")


def gptq_quantization_config(cfg: WeightQuantConfig, method: str, version: str, block_prefix: str,
                              in_features: list[int] = (), head: dict | None = None) -> dict:
    """The config.json block that transformers, optimum and GPTQModel read.

    GPTQModel's automatic CPU kernel (torch's int4 pack-mm) needs every input width to be a multiple
    of the group size. Where a layer has a partial last group (SmolLM2: 576 at group 128) we name
    GPTQModel's plain torch kernel, which handles it, so ``from_pretrained(folder)`` runs as it is.
    """
    block = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "sym": cfg.sym,
        "desc_act": bool(getattr(cfg, "act_order", False)),
        "static_groups": bool(getattr(cfg, "static_groups", False)),
        # Loaders require 0 < damp_percent < 1 even where it played no part (RTN: see meta.method).
        "damp_percent": getattr(cfg, "damp_percent", 0.01),
        "true_sequential": True,
        # Named, not guessed: optimum's name patterns miss some families (MPT's transformer.blocks).
        "block_name_to_quantize": block_prefix,
        "meta": {"quantizer": [f"compress-workbench:{version}"], "method": method},
    }
    if cfg.group_size != -1 and any(width % cfg.group_size for width in in_features):
        block["backend"] = "torch"
    if head is not None:
        # GPTQModel's and vLLM's names for a quantized head and for per-module settings.
        block["lm_head"] = True
        dynamic = dynamic_override(head, cfg)
        if dynamic:
            block["dynamic"] = dynamic
    return block


def save_quantized(model, tokenizer, folder: Path, quantization_config: dict, manifest: dict,
                   force: bool = False) -> Path:
    """Write the quantized model atomically; returns the final folder."""
    with atomic_folder(folder, force=force) as tmp:
        model.config.quantization_config = quantization_config
        try:
            with float_copies_for_save(model, manifest.get("lm_head")):
                model.save_pretrained(tmp, safe_serialization=True)
        finally:
            del model.config.quantization_config
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return folder


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def _quantized_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {qweight, qzeros, scales, g_idx[, bias]}} for every packed layer in the folder."""
    from safetensors import safe_open

    layers: dict[str, dict[str, torch.Tensor]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for key in keys:
                if key.endswith(QUANTIZED_SUFFIX):
                    name = key[: -len(QUANTIZED_SUFFIX)]
                    layers[name] = {part: f.get_tensor(f"{name}.{part}") for part in PACKED_PARTS
                                    if f"{name}.{part}" in keys}
    return layers


def _module_name(model, saved_name: str) -> str:
    """The in-memory name of a packed layer saved as ``saved_name``. transformers renames a few modules
    between file and memory (GPT-NeoX's head: embed_out on disk, lm_head in memory); a packed name that
    is no module of the model is the output head's saved name."""
    try:
        model.get_submodule(saved_name)
        return saved_name
    except AttributeError:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return saved_name if head is None else module_name(model, head)


def load_quantized(folder: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a GPTQ-format folder, with our QuantLinear in place of each packed layer."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    check_checkpoint(folder)
    config = AutoConfig.from_pretrained(folder)
    qcfg = getattr(config, "quantization_config", None)
    if qcfg is None:
        raise UserError(f"{folder} is not a quantized checkpoint (no quantization_config in config.json)")
    # The raw block: transformers' GPTQConfig object drops keys it does not know (GPTQModel's dynamic).
    qcfg = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    if qcfg.get("quant_method") != "gptq":
        raise UserError(f"{folder} uses quant_method {qcfg.get('quant_method')!r}; this loader reads gptq checkpoints")
    if qcfg.get("checkpoint_format", "gptq") != "gptq":
        raise UserError(f"{folder} has checkpoint_format {qcfg.get('checkpoint_format')!r}; this loader reads 'gptq'")
    del config.quantization_config
    cls = auto_class(config)
    quantized = _quantized_tensors(folder)
    # transformers loads everything that is not packed (and applies its own key renames, e.g.
    # GPT-NeoX's embed_out); the packed layers' dense weights are missing there by design.
    with quiet_transformers():
        model, info = cls.from_pretrained(folder, config=config, dtype=dtype, use_safetensors=True,
                                          output_loading_info=True)
    expected_missing = set()  # the packed layers' dense weights, under their saved and in-memory names
    for saved_name, tensors in quantized.items():
        name = _module_name(model, saved_name)
        expected_missing |= {f"{saved_name}.weight", f"{name}.weight"}
        bits, group_size = layer_settings(qcfg, name)
        bias = tensors.get("bias")
        layer = QuantLinear(tensors["g_idx"].numel(), tensors["scales"].shape[1], bits, group_size,
                            bias=bias is not None, bias_dtype=bias.dtype if bias is not None else torch.float16)
        try:
            layer.load_state_dict(tensors, strict=True)
            set_submodule(model, name, layer)
        except (RuntimeError, AttributeError) as exc:
            raise UserError(f"{folder}: packed layer {name} does not fit the model ({str(exc).splitlines()[0]}): "
                            "re-create the checkpoint")
    missing = set(info.get("missing_keys", ())) - expected_missing
    if missing:
        raise UserError(f"{folder} lacks weights {sorted(missing)[:3]}: re-create the checkpoint")
    head = (read_manifest(folder) or {}).get("lm_head") or {}
    if head.get("tied_embedding"):
        # The file's float16 embedding is for other loaders; ours reads rows from the packed head.
        set_submodule(model, head["tied_embedding"], QuantEmbedding(model.get_submodule(head["module"]), dtype))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    return model, tokenizer
