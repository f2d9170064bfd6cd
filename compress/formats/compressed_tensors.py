"""The config.json block of a compressed-tensors checkpoint, as vLLM and the compressed-tensors package read it:
format pack-quantized for integer weights with float activations, int-quantized for W8A8 (int8 weights stored one
per byte, int8 activations made per token as each matmul runs), float-quantized for FP8 W8A8.

There is one config group per (bits, group size) in the model: the run's own settings targeting every ``Linear``,
mixed precision's other options targeting their layers by name, and a quantized output head in a group of its own
(vLLM runs it as a linear layer; the config says the head is not tied to the embedding, which gets a float16 copy of
the head's dequantized rows). Every linear layer left in float is listed under ``ignore`` (vLLM refuses a linear
layer that no group targets and ``ignore`` does not name).

The layers' tensors are written by compress.quant.layouts (CompressedTensorsLayout, IntQuantizedLayout).
"""

from __future__ import annotations

import re

COMPRESSED_TENSORS_VERSION = "0.20.1"
"""The compressed-tensors release whose config schema this writes (and the tests read back with)."""


def weight_args(bits: int, group_size: int, sym: bool, act_order: bool, number_type: str = "int") -> dict:
    """compressed-tensors' QuantizationArgs for a weight: integer (or float: FP8), static, per group or per output
    channel."""
    return {
        "num_bits": bits,
        "type": number_type,
        "symmetric": sym,
        "group_size": None if group_size == -1 else group_size,
        "strategy": "channel" if group_size == -1 else "group",
        "block_structure": None,
        "dynamic": False,
        # "weight" (static) act order: columns were quantized in act order, but each group's grid belongs to its
        # contiguous columns, so loading needs no group index. vLLM refuses the other kind ("group").
        "actorder": "weight" if act_order else None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def activation_args(bits: int, number_type: str = "int") -> dict:
    """compressed-tensors' QuantizationArgs for activations quantized as each matmul runs: integer (or float),
    symmetric, one scale per token (what vLLM's W8A8 kernels do)."""
    return {"num_bits": bits, "type": number_type, "symmetric": True, "group_size": None, "strategy": "token",
            "block_structure": None, "dynamic": True, "actorder": None, "observer": None, "observer_kwargs": {}}


def storage_format(cfg) -> str:
    """pack-quantized (codes packed into int32 words) for float activations; int-quantized (one int8 per weight) for
    W8A8, the layout vLLM's int8 kernels read."""
    if not getattr(cfg, "act_bits", None):
        return "pack-quantized"
    return "float-quantized" if cfg.float_codes else "int-quantized"


def quantization_config(cfg, method: str, version: str, layer_options: dict[str, tuple[int, int]],
                        ignore: list[str], head: dict | None = None) -> dict:
    """``layer_options``: qualified name -> (bits, group size) of every packed layer; ``ignore``: the linear layers
    left in float; ``head``: the manifest's record of a quantized output head (compress.quant.head.head_record),
    which gets a group of its own (its grid is symmetric, whatever the body's)."""
    act_order = bool(getattr(cfg, "act_order", False))
    act_bits = getattr(cfg, "act_bits", None)
    fmt = storage_format(cfg)
    number_type = "float" if getattr(cfg, "float_codes", False) else "int"
    groups = {"group_0": {"targets": ["Linear"],
                          "weights": weight_args(cfg.bits, cfg.group_size, cfg.sym, act_order, number_type),
                          "input_activations": activation_args(act_bits, number_type) if act_bits else None,
                          "output_activations": None, "format": fmt}}
    others: dict[tuple[int, int], list[str]] = {}
    for name, option in sorted(layer_options.items()):
        if option != (cfg.bits, cfg.group_size):
            others.setdefault(option, []).append(name)
    for index, ((bits, group_size), names) in enumerate(sorted(others.items()), start=1):
        groups[f"group_{index}"] = {
            # Anchored patterns: a bare name would also match the same path inside a longer one in some readers.
            "targets": [f"re:^{re.escape(name)}$" for name in names],
            "weights": weight_args(bits, group_size, cfg.sym, act_order),
            "input_activations": None, "output_activations": None, "format": "pack-quantized"}
    if head is not None:
        groups["lm_head"] = {
            "targets": [f"re:^{re.escape(head['module'])}$"],
            "weights": weight_args(head["bits"], head["group_size"], head["sym"], False),
            "input_activations": None, "output_activations": None, "format": "pack-quantized"}
        ignore = [name for name in ignore if name != head["module"]]
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "global_compression_ratio": None,
        "version": COMPRESSED_TENSORS_VERSION,
        "meta": {"quantizer": [f"compress-workbench:{version}"], "method": method},
    }


def _weights_of(qcfg: dict, name: str) -> dict:
    """The weights' QuantizationArgs of the packed layer ``name``: the first group that targets it by pattern,
    else the group that targets every Linear."""
    fallback = None
    for group in qcfg.get("config_groups", {}).values():
        weights = group.get("weights") or {}
        for target in group.get("targets", []):
            if target == "Linear":
                fallback = weights
            elif (target.startswith("re:") and re.match(target[3:], name)) or target == name:
                return weights
    if fallback is None:
        raise ValueError(f"no config group targets {name}")
    return fallback


def layer_settings(qcfg: dict, name: str) -> tuple[int, int]:
    """(bits, group size) of the packed layer ``name``."""
    weights = _weights_of(qcfg, name)
    return int(weights["num_bits"]), -1 if weights.get("group_size") in (None, -1) else int(weights["group_size"])


def layer_symmetric(qcfg: dict, name: str) -> bool:
    """Whether the packed layer ``name`` has a symmetric grid (no stored zero points): a head may differ from the
    body."""
    return bool(_weights_of(qcfg, name).get("symmetric", True))
