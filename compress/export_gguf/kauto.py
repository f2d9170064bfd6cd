"""`--type auto --bpw B`: each block linear's ggml type chosen under a size budget from measured sensitivities, as
`--avg-bits` chooses bits (compress.quant.mixed), over the K types (and, where rows hold no K blocks, the blocks of
32 llama.cpp falls back to). llama.cpp's fixed mixes give more bits to the same tensors in every model; here each
tensor's own cost decides: its block's output error when it alone is rounded into a type (on the float model's
calibration activations), against the bytes the type stores. A block's experts of one kind share one type (one
tensor in llama.cpp), their costs added."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.errors import UserError
from compress.export_gguf.kmix import FALLBACK, K_BLOCK
from compress.export_gguf.kquants import KFORMATS, LEGACY_FORMATS, dequantize, fit_weighted
from compress.quant.mixed import LayerCost, average_bits, choose_options, fuse, unfuse

FORMATS = {**KFORMATS, **LEGACY_FORMATS}
AUTO_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


def bits_per_weight(kind: str) -> float:
    fmt = FORMATS[kind]
    return 8 * fmt.block_bytes / fmt.block


def candidate_types(row_length: int) -> list[str]:
    """The types a tensor with rows of ``row_length`` can take: the K types, or their fallbacks."""
    kinds = {kind if row_length % K_BLOCK == 0 else FALLBACK[kind] for kind in AUTO_TYPES}
    return sorted(kinds, key=bits_per_weight)


@dataclass
class TypeCost(LayerCost):
    """A layer's (or a stack of experts') measured losses per ggml type, and the bits each type stores."""

    def bits(self, option: str) -> int:
        fmt = FORMATS[option]
        return sum(rows * cols // fmt.block * fmt.block_bytes * 8 for rows, cols in self.shapes)


def fake_quantize(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The weight as ``kind`` stores it (fitted on the weights alone: what ranks the types)."""
    return dequantize(fit_weighted(weight.float().cpu(), FORMATS[kind])).to(weight.device)


def choose_types(costs: list[LayerCost], bpw: float, stacks: list[list[str]]) -> tuple[dict[str, str], float]:
    """Each layer's type (a stack's members share one), the least summed loss within ``bpw`` bits per weight of the
    layers' stored blocks; and the average reached."""
    typed = [TypeCost(c.name, c.shape, c.losses) for c in costs]
    fused = fuse(typed, stacks)
    try:
        choice = choose_options(fused, bpw)
    except UserError as err:  # its wording names --avg-bits
        floor = average_bits(fused, {c.name: min(c.losses, key=c.bits) for c in fused})
        raise UserError(f"--bpw {bpw:g} is below {floor:.3f}, what the smallest types store: raise it") from err
    return unfuse(choice), average_bits(fused, choice)


def type_bits_per_weight(types: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> float:
    """Bits per weight stored by ``types`` (tensor -> type) over those tensors: how a mix's size is compared."""
    stored = sum(bits_per_weight(kind) * _count(shapes[name]) for name, kind in types.items())
    return stored / sum(_count(shapes[name]) for name in types)


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
