"""Quantized checkpoints: a Hugging Face folder in the standard GPTQ layout, and our own loader.

The folder holds config.json with a ``quantization_config`` block (quant_method gptq), safetensors
weights where every quantized linear is stored as qweight/qzeros/scales/g_idx (checkpoint_format
"gptq", zero points minus one, for symmetric grids; "gptq_v2", zero points as they are, for asymmetric
ones), the tokenizer, and ``compress_manifest.json`` recording how it was
made. transformers loads it with GPTQModel + optimum installed; ``load_quantized`` runs it without
them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from compress.errors import UserError
from compress.formats import compressed_tensors as ct
from compress.formats import packed_settings
from compress.lazy import LazyModel, empty_model
from compress.models import check_checkpoint
from compress.output import MANIFEST_NAME
from compress.quant.config import WeightQuantConfig
from compress.quant.head import QuantEmbedding, dynamic_override, layer_settings
from compress.quant.layouts import LAYOUTS
from compress.quant.linear import QuantLinear
from compress.quant.primitives import ZERO_OFFSETS
from compress.select import set_submodule


def gptq_quantization_config(cfg: WeightQuantConfig, method: str, version: str, block_prefix: str,
                              in_features: list[int] = (), head: dict | None = None,
                              layer_overrides: dict | None = None) -> dict:
    """The config.json block that transformers, optimum and GPTQModel read.

    ``layer_overrides`` (qualified layer name -> LayerOption) become GPTQModel's ``dynamic`` per-module
    settings, which GPTQModel and our loader read (mixed precision).

    GPTQModel's automatic CPU kernel (torch's int4 pack-mm) needs every input width to be a multiple
    of the group size. Where a layer has a partial last group (SmolLM2: 576 at group 128) we name
    GPTQModel's plain torch kernel, which handles it, so ``from_pretrained(folder)`` runs as it is.
    """
    block = {
        "quant_method": "gptq",
        "checkpoint_format": cfg.checkpoint_format,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "sym": cfg.sym,
        "desc_act": bool(getattr(cfg, "act_order", False)),
        # group-aware order keeps each group its own contiguous columns too: the trivial group index
        "static_groups": bool(getattr(cfg, "static_groups", False) or getattr(cfg, "group_aware", False)),
        # Loaders require 0 < damp_percent < 1 even where it played no part (RTN: see meta.method).
        "damp_percent": getattr(cfg, "damp_percent", 0.01),
        "true_sequential": True,
        # Named, not guessed: optimum's name patterns miss some families (MPT's transformer.blocks).
        "block_name_to_quantize": block_prefix,
        "meta": {"quantizer": [f"compress-workbench:{version}"], "method": method},
    }
    if cfg.group_size != -1 and any(width % cfg.group_size for width in in_features):
        block["backend"] = "torch"
    dynamic = {}
    for name, option in sorted((layer_overrides or {}).items()):
        if (option.bits, option.group_size) != (cfg.bits, cfg.group_size):
            dynamic[f"+:^{re.escape(name)}$"] = {"bits": option.bits, "group_size": option.group_size}
    if head is not None:
        # GPTQModel's and vLLM's names for a quantized head and for per-module settings.
        block["lm_head"] = True
        dynamic.update(dynamic_override(head, cfg))
    if dynamic:
        block["dynamic"] = dynamic
    return block


def read_manifest(folder: Path) -> dict | None:
    """The checkpoint's manifest (None when it has none); a damaged one is an error, not an empty record."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged ({exc}): re-create the checkpoint, or restore the file from a copy")
    if not isinstance(manifest, dict):
        raise UserError(f"{path} is damaged (not a JSON object): re-create the checkpoint, or restore it from a copy")
    return manifest


@dataclass
class PackedLayers:
    """How a checkpoint's packed layers are found and built: their layout (compress.quant.layouts), each layer's
    (bits, group size) and whether its grid is symmetric."""
    layout: str
    settings: Callable[[str], tuple[int, int]]
    symmetric: Callable[[str], bool]
    act_bits: int | None = None

    @property
    def suffix(self) -> str:
        """The tensor name's end that marks a packed layer (``NAME.qweight``, ``NAME.weight_packed``)."""
        return "." + LAYOUTS[self.layout].packed_name


def packed_layers(folder: Path, qcfg: dict) -> PackedLayers:
    method = qcfg.get("quant_method")
    if method == "gptq":
        checkpoint_format = qcfg.get("checkpoint_format", "gptq")
        if checkpoint_format not in ZERO_OFFSETS:
            raise UserError(f"{folder} has checkpoint_format {checkpoint_format!r}; this loader reads "
                            f"{' and '.join(repr(f) for f in ZERO_OFFSETS)}")
        sym = packed_settings(qcfg).sym  # the GPTQ layout stores every layer's zero points: one flag for all
        return PackedLayers(checkpoint_format, lambda name: layer_settings(qcfg, name), lambda name: sym)
    if method == "compressed-tensors":
        layouts = {"pack-quantized": "compressed-tensors", "int-quantized": "int-quantized",
                   "float-quantized": "float-quantized"}
        if qcfg.get("format") not in layouts or qcfg.get("quantization_status", "compressed") != "compressed":
            raise UserError(f"{folder} is a compressed-tensors checkpoint in format {qcfg.get('format')!r}; this loader "
                            "reads pack-quantized (integer weights, float activations), int-quantized (W8A8) and "
                            "float-quantized (FP8 W8A8)")
        settings = packed_settings(qcfg)
        return PackedLayers(layouts[qcfg["format"]], lambda name: ct.layer_settings(qcfg, name),
                            lambda name: ct.layer_symmetric(qcfg, name), settings.act_bits)
    raise UserError(f"{folder} uses quant_method {method!r}; this loader reads gptq and compressed-tensors "
                    "checkpoints")


def load_quantized(folder: Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """(model, tokenizer) of a GPTQ or compressed-tensors folder, with our QuantLinear in place of each packed layer.

    The model is built on the meta device and every tensor is read straight into its final place: the
    packed layers' buffers as stored, everything else in ``dtype``. No dense float copy of a packed
    layer is ever made, so a 7B W4 checkpoint opens in about its own size.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    lazy = open_quantized(folder, dtype)
    lazy.materialize_all(device)
    lazy.model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    return lazy.model, tokenizer


def open_quantized(folder: Path, dtype: torch.dtype = torch.float32) -> LazyModel:
    """``load_quantized``'s model before any tensor is read: every module in place on the meta device, each tensor
    read when asked (``LazyModel.materialize``), so a writer can go through it one layer at a time."""
    from transformers import AutoConfig

    folder = Path(folder)
    check_checkpoint(folder)
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None) is None:
        raise UserError(f"{folder} is not a quantized checkpoint (no quantization_config in config.json)")
    # The raw block: transformers' GPTQConfig object drops keys it does not know (GPTQModel's dynamic).
    qcfg = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    packed = packed_layers(folder, qcfg)
    del config.quantization_config
    lazy = LazyModel(folder, dtype, model=empty_model(folder, dtype, config=config))
    model = lazy.model
    head = (read_manifest(folder) or {}).get("lm_head") or {}
    reader = lazy.reader
    for disk_key, memory_key in lazy.names.to_memory.items():
        if not disk_key.endswith(packed.suffix):
            continue
        name = memory_key[: -len(packed.suffix)]
        disk_module = disk_key[: -len(packed.suffix)]
        bits, group_size = packed.settings(name)
        in_features, out_features = LAYOUTS[packed.layout].features(
            lambda buffer: reader.shape_of(f"{disk_module}.{buffer}"), bits)
        bias = f"{disk_module}.bias"
        with torch.device("meta"):
            layer = QuantLinear(in_features, out_features, bits, group_size, bias=bias in reader,
                                bias_dtype=reader.dtype_of(bias) if bias in reader else torch.float16,
                                checkpoint_format=packed.layout, sym=packed.symmetric(name), act_bits=packed.act_bits)
        try:
            set_submodule(model, name, layer)
        except AttributeError:
            raise UserError(f"{folder}: packed layer {name} is no module of a {type(model).__name__}: re-create the "
                            "checkpoint")
    if head.get("tied_embedding"):
        # The file's float16 embedding is for other loaders; ours reads rows from the packed head.
        set_submodule(model, head["tied_embedding"], QuantEmbedding(model.get_submodule(head["module"]), dtype,
                                                                    model.get_submodule(head["tied_embedding"])))
    return lazy
