"""What `compress quantize` is asked for: the shared run settings plus every method's options, each None
unless given (the method's config dataclass holds its defaults). Free of torch, so the command line builds
and checks a request before any heavy import."""

from __future__ import annotations

from dataclasses import dataclass

from compress.errors import UserError
from compress.quant.config import W8A8_WEIGHTS, WeightQuantConfig
from compress.registry import config_fields, get_method
from compress.settings import RunSettings, method_option_values

METHOD_OPTIONS = ("bits", "group_size", "sym", "scale_search", "act_order", "static_groups", "group_aware",
                  "damp_percent", "awq",
                  "act_bits", "smoothing_strength", "quant_type", "double_quant", "int8_threshold")
"""Request settings that belong to some methods' configs: None means "not asked for" (the method's own default,
from its config dataclass); asking a method for one its config does not have is an error, not a silent no-op."""


def takes_option(method: str, option: str) -> bool:
    return option in config_fields(get_method(method))


def methods_taking(option: str) -> str:
    """'it applies to gptq and awq' (the registered methods whose config has ``option``)."""
    from compress.registry import available_methods

    if option == "awq":
        return "use --method awq, or --method gptq --awq"
    if option in ("act_bits", "smoothing_strength"):
        return "W8A8 is --method smoothquant, or --method gptq or rtn with --act-bits 8"
    takers = [m.name for m in available_methods().values() if option in config_fields(m)]
    return f"it applies to {' and '.join(takers) if len(takers) < 3 else ', '.join(takers[:-1]) + ' and ' + takers[-1]}"


@dataclass
class QuantizeRequest(RunSettings):
    method: str = "gptq"
    """Quantization method: gptq, awq or rtn (or a plugin's name)."""
    bits: int | None = None
    """Bits per weight; None: the method's default (4; 8 for W8A8 and smoothquant)."""
    group_size: int | None = None
    """Columns per scale (-1: per output channel); None: the method's default. bitsandbytes has fixed blocks."""
    sym: bool | None = None
    """Symmetric grids; None: the method's default (asymmetric for gptq, awq and rtn)."""
    scale_search: str | None = None
    """How each group's range is chosen: none (min/max), mse or weighted (see scale_search.py); None: the
    method's default (weighted for gptq and awq, none for the data-free rtn)."""
    act_order: bool | None = None
    """GPTQ: quantize columns by decreasing Hessian diagonal (desc_act); None: the method's default (on, as in
    auto-gptq: measured on SmolLM2 with out-of-domain calibration text it decides whether GPTQ beats RTN at W4)."""
    static_groups: bool | None = None
    group_aware: bool | None = None
    """GPTQ: act order by whole groups (GAR), each group's grid chosen as it comes up; None: the default (on)."""
    damp_percent: float | None = None
    awq: bool | None = None
    """gptq: fold AWQ's activation-aware channel scales into each block first."""
    act_bits: int | None = None
    """gptq, rtn: 8 quantizes the activations too (W8A8: int8 per token, dynamic), after SmoothQuant's smoothing;
    the weights then default to 8-bit, symmetric, per output channel."""
    smoothing_strength: float | None = None
    """W8A8: SmoothQuant's alpha for every group of layers; None: searched per group."""
    quant_type: str | None = None
    """bnb 4-bit: nf4 or fp4."""
    double_quant: bool | None = None
    """bnb 4-bit: quantize the block scales too."""
    int8_threshold: float | None = None
    """bnb 8-bit: LLM.int8() outlier threshold."""
    avg_bits: float | None = None
    """Mixed precision: measure each layer's sensitivity, then give every layer the option (3, 4 or 8 bits)
    with the least predicted loss within this average of stored bits per weight (e.g. 4.25)."""
    format: str | None = None
    """Checkpoint format: compressed-tensors (what vLLM and transformers load; the default) or gptq (what GPTQModel
    and transformers load); None: the default. bitsandbytes writes its own."""
    lm_head_bits: int | None = None
    """Also quantize the output head (and an embedding tied to it), data-free, per output channel at
    these bits (8 is the usual choice); None keeps it in float."""

    def method_config(self):
        method = get_method(self.method)
        # A setting left at None takes the method's own default (its config dataclass holds them).
        values = method_option_values(self, METHOD_OPTIONS, method, methods_taking)
        if self.act_order is False and (self.group_aware or self.static_groups):
            flag = "--group-aware" if self.group_aware else "--static-groups"
            raise UserError(f"{flag} shapes the act order's groups, and --no-act-order quantizes the columns in "
                            f"their natural order, where every group is its own columns: drop one of them")
        if values.get("act_bits") is not None:  # W8A8 fixes the weights' settings: they need not be spelled out
            values = W8A8_WEIGHTS | values
        return method, method.config_cls(**values)

    def head_config(self) -> WeightQuantConfig | None:
        if self.lm_head_bits is None:
            return None
        return WeightQuantConfig(bits=self.lm_head_bits, group_size=-1, sym=True)
