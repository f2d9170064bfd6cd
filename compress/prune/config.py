"""Each pruning method's settings and their defaults, one dataclass per method, in one place (with the
pattern and sparsity rules they check): the methods, the API and the command line's help read them here.
No torch, so `compress prune --help` and a request's early checks stay fast."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from compress.errors import UserError
from compress.quant.config import GPTQConfig, WeightQuantConfig, check_hessian_settings

COMPARISONS = ("row", "layer")


@dataclass(frozen=True)
class Pattern:
    """'unstructured' (n = m = 0) or N:M semi-structured sparsity."""
    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float | None:
        return 1 - self.n / self.m if self.m else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else "unstructured"


def parse_pattern(text: str) -> Pattern:
    if text == "unstructured":
        return Pattern()
    n, sep, m = text.partition(":")
    if not sep or not n.isdigit() or not m.isdigit():
        raise UserError(f"unknown sparsity pattern '{text}': use unstructured or N:M such as 2:4 or 4:8")
    pattern = Pattern(int(n), int(m))
    if not 0 < pattern.n < pattern.m:
        raise UserError(f"sparsity pattern {text} must keep some but not all of each group (0 < N < M), e.g. 2:4")
    return pattern


def check_sparsity(sparsity: float) -> float:
    if not 0 <= sparsity < 1:
        raise UserError(f"sparsity {sparsity} is outside [0, 1): give the fraction of weights to remove, e.g. 0.5")
    return sparsity


@dataclass
class PruneConfig:
    DEFAULT_SPARSITY: ClassVar[float] = 0.5
    """The sparsity of an unstructured run that names none (an N:M pattern implies its own)."""

    sparsity: float | None = None
    """Fraction of each layer's weights removed, in [0, 1). Default DEFAULT_SPARSITY; an N:M pattern implies
    1 - N/M."""
    pattern: str = "unstructured"
    """unstructured, or N:M (keep N of every M consecutive input weights of a row), e.g. 2:4."""

    def __post_init__(self) -> None:
        pattern = parse_pattern(self.pattern)
        if pattern.structured:
            if self.sparsity is not None and abs(self.sparsity - pattern.sparsity) > 1e-9:
                raise UserError(f"{pattern} sparsity always removes {pattern.sparsity:.0%} of the weights, not "
                                f"{self.sparsity:.0%}: drop --sparsity or choose another pattern")
            self.sparsity = pattern.sparsity
        elif self.sparsity is None:
            self.sparsity = self.DEFAULT_SPARSITY
        check_sparsity(self.sparsity)

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def tag(self) -> str:
        """Short name for output folders: s50 (50% unstructured) or 2of4."""
        pattern = self.parsed_pattern
        return f"{pattern.n}of{pattern.m}" if pattern.structured else f"s{round(self.sparsity * 100):d}"


@dataclass
class ScoredPruneConfig(PruneConfig):
    comparison: str = "row"
    """Unstructured only: remove the lowest scores within each output row (row) or across the layer (layer)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.comparison not in COMPARISONS:
            raise UserError(f"unknown comparison '{self.comparison}': choose one of {', '.join(COMPARISONS)}")


@dataclass
class WandaConfig(ScoredPruneConfig):
    comparison: str = "row"


@dataclass
class MagnitudeConfig(ScoredPruneConfig):
    comparison: str = "layer"


@dataclass
class SparseGPTConfig(PruneConfig):
    damp_percent: float = 0.01
    """Dampening added to the Hessian diagonal, as a fraction of its mean."""
    block_size: int = 128
    """Columns whose unstructured mask is chosen together (the paper's adaptive mask selection block)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hessian_settings(self.damp_percent, self.block_size)


TARGETS = ("mlp", "heads", "layers")


@dataclass
class StructuredConfig:
    DEFAULT_SPARSITY: ClassVar[float] = 0.25

    target: str = "mlp"
    """What to remove: mlp (channels of every MLP), heads (attention heads or kv groups), layers (decoder blocks)."""
    sparsity: float | None = None
    """Fraction of the MLP channels / heads / layers removed, in [0, 1) (default DEFAULT_SPARSITY); the same
    count in every block."""

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise UserError(f"unknown structured target '{self.target}': choose one of {', '.join(TARGETS)}")
        if self.sparsity is None:
            self.sparsity = self.DEFAULT_SPARSITY
        check_sparsity(self.sparsity)

    @property
    def tag(self) -> str:
        return f"{self.target}{round(self.sparsity * 100):d}"


@dataclass
class KeptWeightsQuantConfig(WeightQuantConfig):
    """``--bits`` of a prune run: the grid of the kept weights, and the dampening of the GPTQ step that quantizes
    them keeping the mask after magnitude or Wanda (SparseGPT's joint mode uses its own config's)."""
    sym: bool = True
    damp_percent: float = GPTQConfig.damp_percent
    """Dampening added to the Hessian diagonal, as a fraction of its mean (GPTQ's default)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_hessian_settings(self.damp_percent, 1)


PRUNE_CONFIGS: dict[str, type] = {"magnitude": MagnitudeConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig,
                                  "structured": StructuredConfig}
"""Built-in method name -> its config (a test checks each against the registered method's config_cls)."""
