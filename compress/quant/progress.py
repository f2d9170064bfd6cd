"""What a block-by-block quantize run records beside its weights at each checkpoint, and what ``--resume`` reads
back: written and read here only."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from compress.errors import UserError
from compress.quant.apply import LayerRecord, QuantizeStats
from compress.quant.awq import GroupScaling


@dataclass
class QuantizeProgress:
    head: dict | None = None
    """The quantized head's manifest record (the head is written before any block), or None."""
    mixed: dict | None = None
    """The mixed-precision choice (measured once, before any block), or None."""
    stats: QuantizeStats = field(default_factory=QuantizeStats)
    """The layers quantized so far and AWQ's scalings."""

    def to_dict(self) -> dict:
        return {"head": self.head, "layers": [dataclasses.asdict(x) for x in self.stats.layers],
                "awq_scales": [dataclasses.asdict(x) for x in self.stats.scalings], "mixed": self.mixed}

    @classmethod
    def from_dict(cls, record: dict, where: str) -> "QuantizeProgress":
        try:
            stats = QuantizeStats(layers=[LayerRecord(**r) for r in record.get("layers", [])],
                                  scalings=[GroupScaling(**r) for r in record.get("awq_scales", [])])
            return cls(record.get("head"), record.get("mixed"), stats)
        except (AttributeError, TypeError) as exc:
            raise UserError(f"{where} is damaged (its quantize record: {exc}): run the same command without --resume "
                            "and with --force to start again") from None
