"""Pure math: a quantized weight in our GPTQ layout re-expressed, code for code, as ggml blocks.

ggml's legacy types hold 32 consecutive weights of one row per block:

* Q4_0: fp16 d, then 16 bytes of 4-bit codes q; w = d * (q - 8). Byte j holds weight j in its low nibble
  and weight j + 16 in its high nibble.
* Q4_1: fp16 d, fp16 m, then the 16 bytes laid out as Q4_0's; w = d * q + m.
* Q8_0: fp16 d, then 32 signed bytes q; w = d * q.

Our codes are w = s * (q - z) per group of input columns, with s already an fp16 value. So a symmetric
4-bit group of 32 (z = 8) is a Q4_0 block with d = s and the same codes, an asymmetric one is a Q4_1 block
with d = s and m = -z * s (rounded to fp16: the one inexact number), and a symmetric 8-bit group of 32
(z = 128) is a Q8_0 block with q - 128 as the signed byte. A block covers 32 columns in their original
order, so the groups must be exactly those (group size 32, no act-order permutation of the groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from compress.errors import UserError
from compress.quant.primitives import QuantizedWeight, default_g_idx

BLOCK = 32


@dataclass(frozen=True)
class BlockType:
    name: str
    bits: int
    sym: bool
    bytes_per_block: int


BLOCK_TYPES = {
    "q4_0": BlockType("q4_0", 4, True, 18),
    "q4_1": BlockType("q4_1", 4, False, 20),
    "q8_0": BlockType("q8_0", 8, True, 34),
}


def check_grid(qw: QuantizedWeight, block_type: BlockType, name: str) -> None:
    """One-line errors for a weight whose grid is not ``block_type``'s, naming the quantize flags that give it."""
    flags = f"--bits {block_type.bits} --group-size 32 {'--sym' if block_type.sym else '--asym'} --no-act-order"
    out_features, in_features = qw.codes.shape
    if qw.bits != block_type.bits:
        raise UserError(f"{name} has {qw.bits}-bit codes; {block_type.name} holds {block_type.bits}-bit ones: "
                        f"quantize with {flags}")
    if in_features % BLOCK:
        raise UserError(f"{name} has {in_features} input columns, not a multiple of 32: ggml blocks cannot hold it")
    if not torch.equal(qw.g_idx.long().cpu(), default_g_idx(in_features, BLOCK).long()):
        raise UserError(f"{name}'s groups are not 32 consecutive columns each (group size or act-order): "
                        f"quantize with {flags}")
    middle = 2 ** (block_type.bits - 1)
    if block_type.sym and not bool((qw.zero == middle).all()):
        raise UserError(f"{name} has asymmetric zero points; {block_type.name} is symmetric: quantize with {flags}, "
                        "or export as q4_1")


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """[n_blocks, 32] codes in 0..15 -> [n_blocks, 16] bytes: byte j = code j | code (j + 16) << 4."""
    return (codes[:, :16] | (codes[:, 16:] << 4)).astype(np.uint8)


def encode(qw: QuantizedWeight, block_type: BlockType, name: str = "weight") -> np.ndarray:
    """The weight's blocks as ggml stores them: uint8 [out_features, in_features / 32 * bytes_per_block]."""
    check_grid(qw, block_type, name)
    out_features, in_features = qw.codes.shape
    n = in_features // BLOCK
    codes = qw.codes.cpu().numpy().astype(np.int32).reshape(out_features * n, BLOCK)
    # scale/zero are [groups, out]: one per block, in row-major block order.
    scale = qw.scale.t().contiguous().cpu().numpy().astype(np.float16).reshape(-1, 1)
    if block_type.name == "q4_0":
        body = _nibbles(codes.astype(np.uint8))
        blocks = np.concatenate([scale.view(np.uint8), body], axis=1)
    elif block_type.name == "q4_1":
        zero = qw.zero.t().contiguous().cpu().numpy().astype(np.float32).reshape(-1, 1)
        minimum = (-zero * scale.astype(np.float32)).astype(np.float16)
        blocks = np.concatenate([scale.view(np.uint8), minimum.view(np.uint8), _nibbles(codes.astype(np.uint8))],
                                axis=1)
    else:
        signed = (codes - 128).astype(np.int8).view(np.uint8)
        blocks = np.concatenate([scale.view(np.uint8), signed], axis=1)
    return np.ascontiguousarray(blocks.reshape(out_features, n * block_type.bytes_per_block))
