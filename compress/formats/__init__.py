"""Checkpoint formats a quantized model is written in, one entry each: the layout of its packed layers
(compress.quant.layouts), the config.json block that names it, what it cannot hold (checked on the model's
skeleton before any work, one line each), and the engines that load it. No torch at import: the command line's
help and early checks read this table.

* ``compressed-tensors`` (the default): vLLM's format (pack-quantized: asymmetric grids with zero points, groups
  of contiguous columns that divide every input width; int-quantized for W8A8), read by vLLM and by transformers
  with the compressed-tensors package.
* ``gptq``: the GPTQ layout (v1 for symmetric grids, v2 for asymmetric ones), read by GPTQModel and transformers
  (through GPTQModel and optimum), and by vLLM only for symmetric 4-bit grids without a group order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import gcd

from compress.errors import UserError

DEFAULT_FORMAT = "compressed-tensors"
FALLBACK_GROUP_SIZES = (128, 64, 32)
"""Group sizes a default (not asked for) group size steps down through until one divides every input width."""


@dataclass(frozen=True)
class LayerWidth:
    name: str
    in_features: int


def fitting_group_sizes(widths: list[LayerWidth]) -> list[int]:
    """Group sizes of 32 columns or more that divide every width (the divisors of their common divisor)."""
    common = 0
    for width in widths:
        common = gcd(common, width.in_features)
    return [size for size in range(32, common + 1) if common % size == 0]


def first_misfit(group_size: int, widths: list[LayerWidth]) -> LayerWidth | None:
    if group_size == -1:
        return None
    return next((w for w in widths if w.in_features % group_size), None)


TRANSFORMERS_CANNOT = {
    "falcon": "its layers are FalconLinear, a subclass that optimum does not replace and compressed-tensors leaves "
              "without the weight its forward reads",
    "mixtral": "transformers 5 fuses the experts into 3-D tensors that neither quantizer replaces",
    "qwen2_moe": "transformers 5 fuses the experts into 3-D tensors that neither quantizer replaces",
}
"""Families whose packed checkpoints transformers cannot run, in either format (tests/test_checkpoint.py,
tests/formats); GPTQModel and our loader run them."""


VLLM_FAMILIES = ("llama", "mistral", "gpt_neox", "opt", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
"""Families whose default checkpoints a test loads in vLLM's CPU build (tests/backends/test_vllm.py); the closing
line names vLLM for these only."""
VLLM_HEAD_FAMILIES = ("llama", "mistral")
"""The same for a packed head (--lm-head-bits): vLLM 0.32's OPT builds its head without the quantization config, and
runs GPT-NeoX through its transformers backend, so only these read ``lm_head.weight_packed``."""
VLLM_W8A8_FAMILIES = ("llama", "mistral", "opt")
"""The same for W8A8, int8 and FP8. Not GPT-NeoX: vLLM 0.32's CPU build runs it through its transformers backend,
which hands the int8 kernel 3-D activations that it refuses ("mat1 must be a 2D tensor"); its 4-bit kernel takes
them."""


def group_order(cfg) -> bool:
    """GPTQ's act order by groups (each group's grid made as its columns come up: a group index, no contiguous
    groups), not the static kind."""
    return bool(getattr(cfg, "act_order", False) and not getattr(cfg, "static_groups", False)
                and not getattr(cfg, "group_aware", False))


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    summary: str
    contiguous_groups: bool
    """Every group is a run of contiguous input columns that divides the width (no group order, no partial group)."""
    bits: tuple[int, ...]
    activations: bool
    """It can say that activations are quantized too (W8A8)."""

    def layout(self, cfg) -> str:
        """The packed layers' layout (compress.quant.layouts) for a method's config."""
        if self.name == "gptq":
            return cfg.checkpoint_format
        if not getattr(cfg, "act_bits", None):
            return self.name
        return "float-quantized" if cfg.float_codes else "int-quantized"

    def engines(self, cfg, head_bits: int | None = None, mixed_bits: frozenset[int] | None = None,
                model_type: str | None = None) -> list[str]:
        """The engines that load a checkpoint of this format made with ``cfg`` (those a test reads it back in), as
        the closing line names them. vLLM: 4-bit layers (its CPU kernels take no other width), a head packed in
        compressed-tensors at 4 bits too (``head_bits``) in a family of ``VLLM_HEAD_FAMILIES``, mixed precision
        whose options (``mixed_bits``: the bit widths chosen) are all 4-bit, no group order, a family in
        ``VLLM_FAMILIES``; or W8A8 (its int8 kernels).
        transformers: not for the families in ``TRANSFORMERS_CANNOT``."""
        ours = "compress bench (our loader)"
        if self.name == "compressed-tensors":
            engines = ["transformers (with compressed-tensors)", ours]
        else:
            engines = ["GPTQModel", "transformers (with GPTQModel and optimum)", ours]
        if model_type in TRANSFORMERS_CANNOT:
            engines = [engine for engine in engines if not engine.startswith("transformers")]
        if self._vllm_runs(cfg, head_bits, mixed_bits, model_type):
            engines.insert(0, "vLLM")
        return engines

    def _vllm_runs(self, cfg, head_bits: int | None, mixed_bits: frozenset[int] | None, model_type: str | None
                   ) -> bool:
        if getattr(cfg, "act_bits", None) == 8:
            return model_type in VLLM_W8A8_FAMILIES
        if model_type not in VLLM_FAMILIES or group_order(cfg) or (self.name != "compressed-tensors" and not cfg.sym):
            return False
        if self.name == "gptq" and (head_bits or mixed_bits):  # GPTQModel's per-module overrides: not tested there
            return False
        if head_bits is not None and (head_bits != 4 or model_type not in VLLM_HEAD_FAMILIES):
            return False
        return cfg.bits == 4 and (mixed_bits is None or mixed_bits == {4})

    def fit_group_size(self, cfg, widths: list[LayerWidth], asked: bool) -> int:
        """The group size this format writes ``cfg`` with: a default one (not ``asked``) that does not divide every
        width steps down (128 -> 64 -> 32) where the format needs groups that do."""
        if asked or not self.contiguous_groups or first_misfit(cfg.group_size, widths) is None:
            return cfg.group_size
        # Packed widths are multiples of 32, so the last step always fits.
        return next(size for size in FALLBACK_GROUP_SIZES
                    if size < cfg.group_size and first_misfit(size, widths) is None)

    def why_not(self, cfg, widths: list[LayerWidth], head_bits: int | None = None) -> str | None:
        """Why this format cannot hold ``cfg`` with a head packed at ``head_bits`` (one clause, with the fix), or
        None."""
        if cfg.bits not in self.bits:
            return f"it holds {', '.join(map(str, self.bits))}-bit weights, not {cfg.bits}-bit ones"
        if head_bits is not None and head_bits not in self.bits:
            return f"it holds {', '.join(map(str, self.bits))}-bit weights, not a {head_bits}-bit head"
        if getattr(cfg, "act_bits", None) and not self.activations:
            return "it has no way to say that activations are quantized (W8A8 is written in compressed-tensors)"
        if not self.contiguous_groups:
            return None
        if group_order(cfg):
            return ("it stores groups of contiguous columns, so act order needs whole groups (drop "
                    "--no-group-aware, or add --static-groups, or use --no-act-order)")
        misfit = first_misfit(cfg.group_size, widths)
        if misfit is not None:
            fits = ", ".join(map(str, fitting_group_sizes(widths)))
            return (f"--group-size {cfg.group_size} does not divide the {misfit.in_features} input features of "
                    f"{misfit.name}, and vLLM needs groups that divide every width (choose {fits} or -1)")
        return None


FORMATS = {
    "compressed-tensors": CheckpointFormat(
        "compressed-tensors", "vLLM's format (pack-quantized, zero points, contiguous groups); transformers reads it "
        "with the compressed-tensors package", contiguous_groups=True, bits=(2, 4, 8), activations=True),
    "gptq": CheckpointFormat(
        "gptq", "the GPTQ layout (v1 symmetric, v2 asymmetric) that GPTQModel and transformers read",
        contiguous_groups=False, bits=(2, 3, 4, 8), activations=False),
}


def get_format(name: str) -> CheckpointFormat:
    if name not in FORMATS:
        raise UserError(f"unknown format '{name}': choose {' or '.join(FORMATS)}")
    return FORMATS[name]


@dataclass(frozen=True)
class FormatChoice:
    format: CheckpointFormat
    group_size: int
    note: str | None = None
    """Why the default format was passed over, said aloud (None when it was not)."""


def choose_format(asked: str | None, cfg, widths: list[LayerWidth], group_size_asked: bool,
                  head_bits: int | None = None) -> FormatChoice:
    """The format asked for, refused in one line where it cannot hold the settings; without one, the default
    (what vLLM loads) where it can hold them, else the GPTQ layout, with the reason."""
    if asked is not None:
        fmt = get_format(asked)
        group_size = fmt.fit_group_size(cfg, widths, group_size_asked)
        why = fmt.why_not(replace(cfg, group_size=group_size), widths, head_bits)
        if why is not None:
            other = next(name for name in FORMATS if name != fmt.name)
            raise UserError(f"--format {fmt.name} cannot hold these settings: {why}; or use --format {other}")
        return FormatChoice(fmt, group_size)
    default = FORMATS[DEFAULT_FORMAT]
    group_size = default.fit_group_size(cfg, widths, group_size_asked)
    why = default.why_not(replace(cfg, group_size=group_size), widths, head_bits)
    if why is None:
        return FormatChoice(default, group_size)
    return FormatChoice(FORMATS["gptq"], cfg.group_size,
                        f"written in the GPTQ layout, not {DEFAULT_FORMAT} (what vLLM loads): {why}")


PACKED_METHODS = ("gptq", "compressed-tensors")
"""quant_method values of the checkpoints our loader reads (integer codes in packed layers)."""


@dataclass(frozen=True)
class PackedSettings:
    """What a packed checkpoint's quantization_config says, whichever format wrote it."""
    format: str
    bits: int
    """The bits of the layers the run's own settings cover (mixed precision gives some layers others)."""
    group_size: int
    sym: bool
    act_order: bool
    all_bits: frozenset[int]
    method: str | None
    quantizer: list[str] | None
    act_bits: int | None = None
    """W8A8: the activations are quantized per token to these bits as each matmul runs."""
    float_codes: bool = False
    """FP8 weights (and activations)."""


def packed_settings(qcfg: dict) -> PackedSettings | None:
    """None for a config that is not one of ``PACKED_METHODS``."""
    meta = qcfg.get("meta") or {}
    if qcfg.get("quant_method") == "gptq":
        bits = int(qcfg["bits"])
        overrides = {int(v.get("bits", bits)) for k, v in (qcfg.get("dynamic") or {}).items() if not k.startswith("-:")}
        return PackedSettings("gptq", bits, int(qcfg["group_size"]), bool(qcfg.get("sym", True)),
                              bool(qcfg.get("desc_act", False)), frozenset({bits} | overrides), meta.get("method"),
                              meta.get("quantizer"))
    if qcfg.get("quant_method") == "compressed-tensors":
        groups = [g.get("weights") or {} for g in (qcfg.get("config_groups") or {}).values()]
        main = next((g.get("weights") or {} for g in (qcfg.get("config_groups") or {}).values()
                     if "Linear" in g.get("targets", [])), groups[0] if groups else {})
        if not main:
            return None
        group_size = main.get("group_size")
        activations = next((g.get("input_activations") for g in (qcfg.get("config_groups") or {}).values()
                            if g.get("input_activations")), None)
        return PackedSettings("compressed-tensors", int(main["num_bits"]), -1 if group_size is None else int(group_size),
                              bool(main.get("symmetric", True)), main.get("actorder") is not None,
                              frozenset(int(g["num_bits"]) for g in groups if "num_bits" in g), meta.get("method"),
                              meta.get("quantizer"), int(activations["num_bits"]) if activations else None,
                              main.get("type") == "float")
    return None


def activations_refusal(qcfg: dict | None, reader: str, fix: str) -> str | None:
    """Why ``reader`` (a kernel or an exporter that quantizes weights only) cannot run a W8A8 checkpoint as it says,
    then ``fix``; None for a checkpoint with float activations."""
    settings = packed_settings(qcfg or {})
    if settings is None or settings.act_bits is None:
        return None
    number = "FP8" if settings.float_codes else f"int{settings.act_bits}"
    return (f"this checkpoint is W8A8 (activations quantized to {number} per token as each matmul runs), "
            f"which {reader} does not do: {fix}")
