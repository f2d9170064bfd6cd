"""What a block-by-block prune run records beside its weights at each checkpoint, and what ``--resume`` reads back:
written and read here only."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from compress.errors import UserError
from compress.prune.apply import PrunedLayer, PruneStats


@dataclass
class PruneProgress:
    stats: PruneStats = field(default_factory=PruneStats)
    """The layers pruned so far."""

    def to_dict(self) -> dict:
        return {"layers": [dataclasses.asdict(x) for x in self.stats.layers]}

    @classmethod
    def from_dict(cls, record: dict, where: str) -> "PruneProgress":
        try:
            return cls(PruneStats(layers=[PrunedLayer(**r) for r in record.get("layers", [])]))
        except (AttributeError, TypeError) as exc:
            raise UserError(f"{where} is damaged (its prune record: {exc}): run the same command without --resume "
                            "and with --force to start again") from None
