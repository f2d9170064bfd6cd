"""Validated settings shared by the weight-quantization methods (one dataclass per method extends it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from compress.errors import UserError
from compress.quant.choices import SCALE_SEARCHES, SUPPORTED_BITS


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

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise UserError(f"unsupported bits {self.bits}: choose one of {', '.join(map(str, SUPPORTED_BITS))}")
        if not isinstance(self.group_size, int) or (self.group_size <= 0 and self.group_size != -1):
            raise UserError(
                f"invalid group size {self.group_size}: use a positive number of columns (e.g. 128) or -1 "
                "for one scale per output channel")
        if self.scale_search not in SCALE_SEARCHES:
            raise UserError(f"unknown scale search '{self.scale_search}': choose one of {', '.join(SCALE_SEARCHES)}")

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
        group = "pc" if self.group_size == -1 else f"g{self.group_size}"
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        suffix = "" if self.sym == defaults["sym"] else ("-sym" if self.sym else "-asym")
        if self.scale_search != defaults["scale_search"]:
            suffix += f"-{self.scale_search}"
        return f"w{self.bits}{group}{suffix}"
