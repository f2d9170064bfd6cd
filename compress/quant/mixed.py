"""Mixed precision under a budget: per-layer bits chosen to minimise the predicted loss at a target
average of stored bits per weight.

Each layer's sensitivity to an option (bits at a group size) is measured once, as the mean squared error
of its block's output when that layer alone is quantized with the option and every other layer is left
in float. Errors made in different blocks are comparable: each is added to the residual stream, which
carries it to the final norm, and that norm scales all of them alike. The predicted loss of a choice is
the sum of its layers' sensitivities; the choice is the one with the least predicted loss whose stored
bits (packed codes, zero points, scales, group index: what the checkpoint holds) fit the budget, found
by a Lagrangian relaxation (each layer independently minimises loss + lambda * bits; lambda bisected to
the budget) followed by greedy upgrades into the budget that is left.

Pure functions of the measured numbers; ``compress.quant.sensitivity`` measures them.
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.errors import UserError
from compress.quant.primitives import num_groups

_WORD_BITS = 32


@dataclass(frozen=True, order=True)
class LayerOption:
    bits: int
    group_size: int

    @property
    def label(self) -> str:
        return f"w{self.bits}" + ("pc" if self.group_size == -1 else f"g{self.group_size}")


def stored_bits(out_features: int, in_features: int, option: LayerOption) -> int:
    """Bits a packed GPTQ layer stores: codes, zero points (packed like the codes), fp16 scales, int32 g_idx."""
    groups = num_groups(in_features, option.group_size)
    return (in_features * out_features * option.bits + groups * out_features * option.bits
            + groups * out_features * 16 + in_features * _WORD_BITS)


@dataclass
class LayerCost:
    name: str
    shape: tuple[int, int]
    """(out_features, in_features)"""
    losses: dict[LayerOption, float]
    """Measured sensitivity of each option (block output mean squared error)."""
    parts: tuple[tuple[int, int], ...] = ()
    """The shapes of the layers a fused unit stands for (see ``fuse``); empty for one layer."""

    def bits(self, option: LayerOption) -> int:
        return sum(stored_bits(out_features, in_features, option) for out_features, in_features in self.shapes)

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        return self.parts or (self.shape,)

    @property
    def weight_count(self) -> int:
        return sum(out_features * in_features for out_features, in_features in self.shapes)


def average_bits(costs: list[LayerCost], choice: dict[str, LayerOption]) -> float:
    weights = sum(c.weight_count for c in costs)
    return sum(c.bits(choice[c.name]) for c in costs) / weights


FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Layers that vLLM fuses into one (qkv_proj, gate_up_proj: Llama, Mistral, Qwen, Gemma, OPT, GPT-J) and so runs with
one quantization scheme: it refuses a checkpoint whose siblings differ."""


def fused_units(names: list[str]) -> list[list[str]]:
    """``names`` grouped as vLLM fuses them (siblings of ``FUSED_SIBLINGS`` under one parent, every one present),
    in their order; every other layer alone."""
    units, placed = [], set()
    present = set(names)
    for name in names:
        if name in placed:
            continue
        parent, _, leaf = name.rpartition(".")
        siblings = next((group for group in FUSED_SIBLINGS if leaf in group), None)
        unit = [f"{parent}.{sibling}" if parent else sibling for sibling in siblings] if siblings else [name]
        if not set(unit) <= present:
            unit = [name]
        units.append(unit)
        placed.update(unit)
    return units


def fuse(costs: list[LayerCost], units: list[list[str]]) -> list[LayerCost]:
    """One cost per unit: the members' losses added (each is measured with that layer alone quantized; added, they
    predict the unit's loss as they predict the model's), their stored bits added, under the members' names joined
    with "+"."""
    by_name = {c.name: c for c in costs}
    fused = []
    for unit in units:
        members = [by_name[name] for name in unit]
        if len(members) == 1:
            fused.append(members[0])
            continue
        options = set.intersection(*(set(m.losses) for m in members))
        fused.append(type(members[0])("+".join(unit), (sum(m.shape[0] for m in members), members[0].shape[1]),
                                      {o: sum(m.losses[o] for m in members) for o in options},
                                      tuple(shape for m in members for shape in m.shapes)))
    return fused


def unfuse(choice: dict[str, LayerOption]) -> dict[str, LayerOption]:
    return {name: option for unit, option in choice.items() for name in unit.split("+")}


def _pick(costs: list[LayerCost], lam: float) -> dict[str, LayerOption]:
    return {c.name: min(c.losses, key=lambda o: (c.losses[o] + lam * c.bits(o), c.bits(o))) for c in costs}


def choose_options(costs: list[LayerCost], avg_bits: float, base: LayerOption | None = None) -> dict[str, LayerOption]:
    """The per-layer options with the least summed loss whose average stored bits per weight is at most
    ``avg_bits``. Where ``base`` (the run's own bits and group size) fits the budget for every layer, no
    layer goes below it: the budget only buys upgrades. Predicted losses add up well enough to rank
    upgrades, not to trade layers down to pay for others: on SmolLM2 at 4.25 bits, a choice that sent 71
    layers to 3 bits to give 32 others 8 bits lost to uniform W4 g128 (perplexity 61.9 against 54.7, a
    short check)."""
    if base is not None and all(base in c.losses for c in costs) \
            and average_bits(costs, {c.name: base for c in costs}) <= avg_bits:
        costs = [LayerCost(c.name, c.shape, {o: v for o, v in c.losses.items() if c.bits(o) >= c.bits(base)}, c.parts)
                 for c in costs]
    weights = sum(c.weight_count for c in costs)
    budget = avg_bits * weights
    cheapest = {c.name: min(c.losses, key=c.bits) for c in costs}
    floor = average_bits(costs, cheapest)
    if floor > avg_bits:
        raise UserError(f"--avg-bits {avg_bits:g} is below {floor:.3f}, the average of the smallest option: "
                        "raise it or allow fewer bits")
    total = lambda choice: sum(c.bits(choice[c.name]) for c in costs)  # noqa: E731
    best = _pick(costs, 0.0)
    if total(best) > budget:
        # Bisect lambda (loss per stored bit) to the smallest value whose choice fits.
        top_loss = max(max(c.losses.values()) for c in costs) or 1.0
        low, high = 0.0, top_loss
        while total(_pick(costs, high)) > budget:
            high *= 4
        for _ in range(100):
            mid = (low + high) / 2
            if total(_pick(costs, mid)) > budget:
                low = mid
            else:
                high = mid
        best = _pick(costs, high)
    # Spend what is left: the upgrade with the most loss saved per extra bit that still fits, repeatedly.
    spent = total(best)
    by_name = {c.name: c for c in costs}
    while True:
        move, gain = None, 0.0
        for name, option in best.items():
            cost = by_name[name]
            for other in cost.losses:
                extra = cost.bits(other) - cost.bits(option)
                saved = cost.losses[option] - cost.losses[other]
                if extra > 0 and saved > 0 and spent + extra <= budget and saved / extra > gain:
                    move, gain = (name, other, extra), saved / extra
        if move is None:
            return best
        name, other, extra = move
        best[name] = other
        spent += extra
