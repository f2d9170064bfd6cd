"""Each quantization method's settings and their defaults, one dataclass per method, in one place: the
methods, the API and the command line's help all read them here. No torch: `compress quantize --help` and
the early checks of a request import this module and answer in a fraction of a second."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from compress.errors import UserError
from compress.quant.choices import ACT_BITS, SCALE_SEARCHES, SUPPORTED_BITS


@dataclass
class WeightQuantConfig:
    bits: int = 4
    """Bits per weight: 8, 4, 3 or 2."""
    group_size: int = 128
    """Input columns sharing one scale; -1 means one scale per output channel."""
    sym: bool = True
    """Symmetric grid (zero point in the middle) or asymmetric (min/max)."""
    scale_search: str = "none"
    """How each group's range is chosen: none (min/max), mse (the shrink with least squared error) or
    weighted (least error weighted by the calibration inputs' mean squares: needs calibration data)."""
    act_bits: int | None = None
    """8: W8A8, activations quantized too, to int8 per token as each matmul runs (dynamic, symmetric), with
    SmoothQuant's smoothing folded into the model first; weights then are 8-bit, symmetric, per output channel
    (what vLLM's int8 kernels run). None: weights only."""
    smoothing_strength: float | None = None
    """W8A8: SmoothQuant's migration strength alpha in [0, 1] (0: no smoothing); None searches it per group of
    layers for the least output error of the quantized group (no smoothing among the candidates)."""

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise UserError(f"unsupported bits {self.bits}: choose one of {', '.join(map(str, SUPPORTED_BITS))}")
        if not isinstance(self.group_size, int) or (self.group_size <= 0 and self.group_size != -1):
            raise UserError(
                f"invalid group size {self.group_size}: use a positive number of columns (e.g. 128) or -1 "
                "for one scale per output channel")
        if self.scale_search not in SCALE_SEARCHES:
            raise UserError(f"unknown scale search '{self.scale_search}': choose one of {', '.join(SCALE_SEARCHES)}")
        check_activation_settings(self)

    @property
    def float_codes(self) -> bool:
        """FP8 weights (E4M3 values times a scale) instead of integer grids."""
        return False

    @property
    def smooths(self) -> bool:
        """Whether SmoothQuant's smoothing runs (it observes calibration data)."""
        return self.act_bits is not None and self.smoothing_strength != 0

    @property
    def checkpoint_format(self) -> str:
        """GPTQ v1 for symmetric grids (every loader reads it); v2 for asymmetric ones. v1 stores zero
        points minus one, which wraps a zero point of 0 around (see primitives.ZERO_OFFSETS), and
        GPTQModel refuses asymmetric v1 files it did not write itself for that reason."""
        return "gptq" if self.sym else "gptq_v2"

    @property
    def tag(self) -> str:
        """Short name for output folders, e.g. w4g128 or w8pc (per channel), with a suffix for each grid
        setting that departs from the method's default (-sym, -asym, -mse, ...)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.act_bits is not None:  # the weights' settings are fixed by the scheme
            search = "" if self.scale_search == defaults["scale_search"] else f"-{self.scale_search}"
            return f"w{self.bits}a{self.act_bits}{search}"
        group = "pc" if self.group_size == -1 else f"g{self.group_size}"
        suffix = "" if self.sym == defaults["sym"] else ("-sym" if self.sym else "-asym")
        if self.scale_search != defaults["scale_search"]:
            suffix += f"-{self.scale_search}"
        return f"w{self.bits}{group}{suffix}"


W8A8_WEIGHTS = {"bits": 8, "group_size": -1, "sym": True}
"""The weight settings --act-bits 8 implies (vLLM's int8 W8A8 kernels take symmetric per-channel int8 weights)."""


def check_activation_settings(cfg: WeightQuantConfig) -> None:
    if cfg.act_bits is None:
        if cfg.smoothing_strength is not None:
            raise UserError("--smoothing-strength applies to W8A8: add --act-bits 8")
        return
    if cfg.act_bits not in ACT_BITS:
        raise UserError(f"unsupported --act-bits {cfg.act_bits}: choose {' or '.join(map(str, ACT_BITS))} (dynamic "
                        "per-token int8), or leave activations in float")
    given = {"bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym}
    if given != W8A8_WEIGHTS:
        raise UserError(f"--act-bits {cfg.act_bits} takes 8-bit symmetric weights with one scale per output channel "
                        "(what vLLM's int8 kernels run): drop --bits, --group-size and --asym, or use --bits 8 "
                        "--group-size -1 --sym")
    if cfg.smoothing_strength is not None and not 0 <= cfg.smoothing_strength <= 1:
        raise UserError(f"invalid --smoothing-strength {cfg.smoothing_strength}: use a value between 0 and 1 "
                        "(SmoothQuant's alpha, e.g. 0.5), or leave it out to search it")


@dataclass
class GPTQConfig(WeightQuantConfig):
    sym: bool = False
    scale_search: str = "weighted"
    """Asymmetric grids whose ranges are searched with the Hessian's diagonal: the best settings measured
    on SmolLM2 (reports/quantize_smollm2.md)."""
    damp_percent: float = 0.01
    """Dampening added to the Hessian diagonal, as a fraction of its mean."""
    act_order: bool = True
    """Quantize columns in order of decreasing Hessian diagonal (desc_act)."""
    group_aware: bool = True
    """With act_order: visit whole groups, the group with the most important column first and each group's
    columns by importance (group-aware reordering, GAR: GPTQModel's act_group_aware), so groups stay runs of
    contiguous columns (compressed-tensors' "weight" act order, which vLLM loads) while each group's grid is
    chosen when it comes up, from the weights as updated so far. Measured on Gemma-3-270M and SmolLM2 against
    static groups (reports/quantize_*.md)."""
    static_groups: bool = False
    """With act_order: fix each group's grid from the original weights before any update. Without group_aware
    this is what keeps act-order groups contiguous (groups made in plain act order need a group index that only
    the GPTQ format holds)."""
    block_size: int = 128
    """Columns updated together (lazy batch updates); changes speed, not results."""
    awq: bool = False
    """Fold AWQ's activation-aware channel scales into each block before GPTQ quantizes it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hessian_settings(self.damp_percent, self.block_size)
        if self.awq and self.act_bits is not None:
            raise UserError("--awq and --act-bits fold different channel scales into the same producers: choose one")


def check_hessian_settings(damp_percent: float, block_size: int) -> None:
    """The settings every inverse-Hessian method shares (GPTQ, SparseGPT)."""
    if not 0 < damp_percent < 1:
        raise UserError(f"invalid damp_percent {damp_percent}: use a fraction between 0 and 1, e.g. 0.01")
    if block_size <= 0:
        raise UserError(f"invalid block_size {block_size}: use a positive number of columns, e.g. 128")


@dataclass
class RTNConfig(WeightQuantConfig):
    sym: bool = False
    """Asymmetric by default: SmolLM2 W4 g128 perplexity 49.98 against 57.30 symmetric (16 windows)."""


@dataclass
class SmoothQuantConfig(RTNConfig):
    """SmoothQuant (Xiao et al., 2023): W8A8 with per-channel round-to-nearest weights, the same as --method rtn
    --act-bits 8. --method gptq --act-bits 8 rounds the weights with GPTQ instead (llm-compressor's W8A8 recipe)."""
    bits: int = 8
    group_size: int = -1
    sym: bool = True
    act_bits: int | None = 8


@dataclass
class Fp8Config(WeightQuantConfig):
    """FP8 W8A8, dynamic (llm-compressor's FP8_DYNAMIC): E4M3 weights with one scale per output channel (max|w| / 448),
    activations rounded to E4M3 per token as each matmul runs. Data-free: no calibration, no smoothing."""
    bits: int = 8
    group_size: int = -1
    sym: bool = True
    act_bits: int | None = 8
    smoothing_strength: float | None = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.act_bits is None or self.scale_search != "none" or self.smoothing_strength != 0:
            raise UserError("--method fp8 has fixed settings (E4M3 weights per channel by their maxima, dynamic FP8 "
                            "activations): drop --act-bits, --scale-search and --smoothing-strength")

    @property
    def float_codes(self) -> bool:
        return True

    @property
    def tag(self) -> str:
        return "fp8-dynamic"


N_GRID = 20
"""AWQ: scale ratios tried per group of layers."""


@dataclass
class AWQConfig(WeightQuantConfig):
    sym: bool = False
    scale_search: str = "weighted"
    """AWQ's own clipping search, in the form every method here shares."""
    n_grid: int = N_GRID
    """Scale ratios tried per group of layers (0, 1/n_grid, ...)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_grid, int) or self.n_grid < 1:
            raise UserError(f"invalid n_grid {self.n_grid}: use a positive number of ratios to try, e.g. 20")
        if self.act_bits is not None:
            raise UserError("--act-bits does not apply to awq: its scales and SmoothQuant's would fight over the "
                            "same channels; use --method gptq --act-bits 8 or --method smoothquant")


QUANT_TYPES = ("nf4", "fp4")


@dataclass
class BnbConfig:
    bits: int = 4
    """8 (LLM.int8()) or 4 (NF4 / FP4)."""
    quant_type: str = "nf4"
    """4-bit code book: nf4 (normal float) or fp4."""
    double_quant: bool = True
    """Quantize the 4-bit block scales too (bnb_4bit_use_double_quant)."""
    int8_threshold: float = 6.0
    """LLM.int8(): input columns with an activation above this run in fp16 (llm_int8_threshold)."""
    compute_dtype: str = "bfloat16"
    """dtype the 4-bit layers dequantize to for their matmul."""

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UserError(f"bitsandbytes quantizes to 8 or 4 bits, not {self.bits}: use --bits 8 or --bits 4")
        if self.quant_type not in QUANT_TYPES:
            raise UserError(f"unknown bitsandbytes quant type '{self.quant_type}': choose {' or '.join(QUANT_TYPES)}")
        if self.compute_dtype not in ("bfloat16", "float16", "float32"):
            raise UserError(f"unknown compute dtype '{self.compute_dtype}': choose bfloat16, float16 or float32")

    @property
    def tag(self) -> str:
        return "int8" if self.bits == 8 else f"{self.quant_type}{'-dq' if self.double_quant else ''}"

    def transformers_config(self):
        import torch
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=self.int8_threshold)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype))


QUANT_CONFIGS: dict[str, type] = {"rtn": RTNConfig, "gptq": GPTQConfig, "awq": AWQConfig,
                                  "smoothquant": SmoothQuantConfig, "fp8": Fp8Config, "bnb": BnbConfig}
"""Built-in method name -> its config (a test checks each against the registered method's config_cls)."""
