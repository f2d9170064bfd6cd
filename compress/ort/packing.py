"""Pure conversions from our QuantizedWeight (GPTQ layout) to ONNX Runtime's block-quantized
operands: MatMulNBits (weight [N, blocks, block bytes], scales [N * blocks], packed uint8 zero points,
``w = (q - zero) * scale``, the GPTQ formula) and GatherBlockQuantized for an 8-bit embedding.

Blocks never straddle our groups (a group of 128 may run as two blocks of 64 with its scale twice);
act-order checkpoints get a column permutation that the graph applies to the input with a Gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from compress.backends.packing import NotPackable, contiguous_groups, kernel_group
from compress.quant.primitives import QuantizedWeight


@dataclass
class NBitsOperands:
    weight: np.ndarray
    """uint8 [N, blocks, block_size * bits / 8]."""
    scales: np.ndarray
    """float32 [N * blocks]."""
    zero_points: np.ndarray
    """uint8: [N * ceil(blocks / 2)] for 4 bits (two per byte, low nibble first), [N * blocks] for 8."""
    bits: int
    block_size: int
    permutation: np.ndarray | None


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pairs along the last axis into bytes, the first of each pair in the low nibble (odd tail: zero pad)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), values.dtype)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def nbits_operands(qw: QuantizedWeight, group_size: int) -> NBitsOperands:
    if qw.bits not in (4, 8):
        raise NotPackable(f"MatMulNBits here takes 4- or 8-bit weights, not {qw.bits}-bit")
    out_features, in_features = qw.codes.shape
    permutation, _ = contiguous_groups(qw.g_idx, in_features if group_size == -1 else group_size)
    block = kernel_group(group_size, in_features)
    codes = qw.codes if permutation is None else qw.codes[:, permutation]
    g_idx = qw.g_idx.long() if permutation is None else qw.g_idx.long()[permutation]
    ours = g_idx[torch.arange(0, in_features, block)]  # our group of each block
    scales = qw.scale[ours].t().contiguous()  # [N, blocks]
    zeros = qw.zero[ours].t().to(torch.uint8).numpy()
    blocks = in_features // block
    q = codes.to(torch.uint8).numpy().reshape(out_features, blocks, block)
    weight = _pack_nibbles(q) if qw.bits == 4 else q
    zero_points = _pack_nibbles(zeros).reshape(-1) if qw.bits == 4 else zeros.reshape(-1)
    return NBitsOperands(np.ascontiguousarray(weight), scales.numpy().astype(np.float32).reshape(-1),
                         np.ascontiguousarray(zero_points), qw.bits, block,
                         None if permutation is None else permutation.numpy().astype(np.int64))


def nbits_dequantize(ops: NBitsOperands, in_features: int) -> np.ndarray:
    """The float weight [N, K] (in kernel column order) that MatMulNBits computes with: for tests."""
    n, blocks, _ = ops.weight.shape
    if ops.bits == 4:
        q = np.stack([ops.weight & 15, ops.weight >> 4], axis=-1).reshape(n, blocks, -1)
        z = np.stack([ops.zero_points & 15, ops.zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    else:
        q, z = ops.weight, ops.zero_points.reshape(n, blocks)
    w = (q.astype(np.float32) - z[..., None]) * ops.scales.reshape(n, blocks)[..., None]
    return w.reshape(n, -1)[:, :in_features]
