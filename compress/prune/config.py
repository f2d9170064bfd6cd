"""Validated settings shared by the weight-pruning methods (one dataclass per method extends it)."""

from __future__ import annotations

from dataclasses import dataclass

from compress.errors import UserError
from compress.prune.masks import COMPARISONS, Pattern, check_sparsity, parse_pattern


@dataclass
class PruneConfig:
    sparsity: float | None = None
    """Fraction of each layer's weights removed, in [0, 1). Default 0.5; an N:M pattern implies 1 - N/M."""
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
            self.sparsity = 0.5
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
