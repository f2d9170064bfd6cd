"""Pure conversions from our QuantizedWeight (GPTQ layout) to the operand layouts of torch's fused
low-bit matmuls. Each returns plain tensors and the input permutation the layer must apply; nothing
here knows about modules or devices.

torch's int4 kernels dequantize group g of output row n as ``(q - 8) * scale + zero`` with a float
zero; ours is ``(q - z) * scale``, so the kernel's zero is ``(8 - z) * scale``. Its int8 kernel is
``q * scale`` per output row with signed codes; our codes are unsigned (0..255, zero point z), so the
signed code is ``q - 128`` and ``(128 - z) * scale`` is a per-row offset, multiplied by the sum of
the input (zero for a symmetric grid, where z = 128).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.quant.primitives import QuantizedWeight

INT4_KERNEL_GROUPS = (256, 128, 64, 32)
"""Group sizes torch's int4 matmul accepts."""


class NotPackable(ValueError):
    """The weight has a layout this kernel cannot run; the message says why."""


def contiguous_groups(g_idx: torch.Tensor, group_size: int) -> tuple[torch.Tensor | None, list[int]]:
    """(permutation or None, group sizes in kernel order) that make each group's columns contiguous.

    An act-order checkpoint assigns columns to groups in an order of their own (g_idx); sorting by
    group puts them together. Every group must then hold ``group_size`` columns, but the last.
    """
    g = g_idx.long()
    order = torch.argsort(g, stable=True)
    sizes = torch.bincount(g).tolist()
    if any(size != group_size for size in sizes[:-1]) or sizes[-1] > group_size:
        raise NotPackable(f"groups of unequal size ({sorted(set(sizes))} columns) cannot be made contiguous")
    identity = torch.equal(order, torch.arange(len(g), device=g.device))
    return (None if identity else order), sizes


def kernel_group(group_size: int, in_features: int) -> int:
    """The int4 kernel's group size for ours: the largest supported size that tiles both our groups
    (a kernel group never spans two of ours; ours repeat their scale over several) and the whole width,
    so no padding is needed (SmolLM2's 576 columns at g128 run as nine kernel groups of 64)."""
    for candidate in INT4_KERNEL_GROUPS:
        if (group_size == -1 or group_size % candidate == 0) and in_features % candidate == 0:
            return candidate
    raise NotPackable(f"no int4 kernel group (of {', '.join(map(str, INT4_KERNEL_GROUPS))}) tiles group size "
                      f"{group_size} and width {in_features}")


@dataclass
class Int4Operands:
    codes: torch.Tensor
    """int32 [out, in] codes in kernel column order."""
    scale_and_zero: torch.Tensor
    """float32 [in / kernel group, out, 2]."""
    kernel_group: int
    permutation: torch.Tensor | None
    """Input columns in kernel order (act-order checkpoints), or None when already in order."""


def int4_operands(qw: QuantizedWeight, group_size: int) -> Int4Operands:
    if qw.bits != 4:
        raise NotPackable(f"a {qw.bits}-bit weight is not int4")
    in_features = qw.codes.shape[1]
    permutation, _ = contiguous_groups(qw.g_idx, in_features if group_size == -1 else group_size)
    kgroup = kernel_group(group_size, in_features)
    codes = qw.codes if permutation is None else qw.codes[:, permutation]
    g_idx = qw.g_idx.long() if permutation is None else qw.g_idx.long()[permutation]
    ours = g_idx[torch.arange(0, in_features, kgroup, device=codes.device)]  # our group of each kernel group
    scale = qw.scale[ours]  # [kernel groups, out]
    zero = (8 - qw.zero[ours]) * scale
    return Int4Operands(codes.to(torch.int32).contiguous(), torch.stack([scale, zero], dim=-1).contiguous(), kgroup,
                        permutation)


@dataclass
class Int8Operands:
    codes: torch.Tensor
    """int8 [out, in] signed codes (q - 128)."""
    scale: torch.Tensor
    """float32 [out]."""
    offset: torch.Tensor | None
    """float32 [out] = (128 - z) * scale, times the input's sum; None for a symmetric grid."""


def int8_operands(qw: QuantizedWeight) -> Int8Operands:
    if qw.bits != 8:
        raise NotPackable(f"a {qw.bits}-bit weight is not int8")
    if qw.scale.shape[0] != 1:
        raise NotPackable(f"{qw.scale.shape[0]} groups per row: torch's int8 matmul takes one scale per output "
                          "row (quantize with --group-size -1)")
    scale, zero = qw.scale[0], qw.zero[0]
    offset = (128 - zero) * scale
    return Int8Operands((qw.codes - 128).to(torch.int8).contiguous(), scale.contiguous(),
                        None if bool((zero == 128).all()) else offset.contiguous())
