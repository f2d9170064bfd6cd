"""Pure math: ggml's K-quant blocks (Q2_K to Q6_K) as data, their exact dequantization, and their bytes.

A K block holds 256 weights of one row (a super-block) in sub-blocks of 16 or 32, each with its own scale (and,
in Q2_K, Q4_K and Q5_K, its own minimum) stored as a small integer under the super-block's float16 ``d`` (and
``dmin``). A weight is ``(d * scale) * code - (dmin * min)``, or ``(d * scale) * (code - offset)`` in the
symmetric formats, in that order of float32 operations: the order ggml's reference dequantizers use, so that our
float32 weights are theirs bit for bit.

Codes are held unsigned here: Q3_K's signed codes -4..3 as 0..7 and Q6_K's -32..31 as 0..63 (``code_offset``); Q3_K's
6-bit scales as 0..63 with their offset of 32 (``scale_offset``); Q6_K's int8 scales as they are. ``encode`` packs
them in ggml's byte layout (``block_q2_K`` ... ``block_q6_K`` in ggml-common.h), which the gguf package's
dequantizers and llama.cpp read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SUPER = 256
"""Weights per K block (QK_K)."""


@dataclass(frozen=True)
class KFormat:
    name: str
    sub: int
    """Weights per sub-block: 16 or 32."""
    code_bits: int
    scale_bits: int
    """Bits of each sub-block's scale (and minimum): 4, 6 or 8 (Q6_K's int8)."""
    has_min: bool
    block_bytes: int
    code_offset: int = 0
    """Subtracted from the stored code in the symmetric formats (Q3_K: 4, Q6_K: 32)."""
    scale_offset: int = 0
    """Subtracted from the stored scale (Q3_K: 32); Q6_K's scales are signed bytes."""

    @property
    def subs(self) -> int:
        return SUPER // self.sub

    @property
    def signed_scales(self) -> bool:
        return self.name == "q6_k"


KFORMATS = {
    "q2_k": KFormat("q2_k", 16, 2, 4, True, 84),
    "q3_k": KFormat("q3_k", 16, 3, 6, False, 110, code_offset=4, scale_offset=32),
    "q4_k": KFormat("q4_k", 32, 4, 6, True, 144),
    "q5_k": KFormat("q5_k", 32, 5, 6, True, 176),
    "q6_k": KFormat("q6_k", 16, 6, 8, False, 210, code_offset=32),
}


@dataclass
class KBlocks:
    """One matrix in K blocks: ``rows`` x ``cols`` weights, ``cols`` a multiple of 256."""

    fmt: KFormat
    codes: torch.Tensor
    """[rows, cols] stored codes, 0 .. 2**code_bits - 1."""
    d: torch.Tensor
    """[rows, cols / 256] float16 super-block scales."""
    scales: torch.Tensor
    """[rows, cols / 256, subs] stored sub-block scales (Q6_K: -128..127, else 0 .. 2**scale_bits - 1)."""
    dmin: torch.Tensor | None = None
    """[rows, cols / 256] float16 super-block minimum scales (formats with minimums)."""
    mins: torch.Tensor | None = None
    """[rows, cols / 256, subs] stored sub-block minimums."""

    def check(self) -> None:
        fmt = self.fmt
        rows, cols = self.codes.shape
        if cols % SUPER:
            raise ValueError(f"{fmt.name}: {cols} columns are not a multiple of {SUPER}")
        supers = cols // SUPER
        low, high = (-128, 127) if fmt.signed_scales else (0, 2 ** fmt.scale_bits - 1)
        assert self.d.shape == (rows, supers) and self.d.dtype == torch.float16
        assert self.scales.shape == (rows, supers, fmt.subs)
        assert int(self.codes.min()) >= 0 and int(self.codes.max()) < 2 ** fmt.code_bits, "codes out of range"
        assert low <= int(self.scales.min()) and int(self.scales.max()) <= high, "scales out of range"
        if fmt.has_min:
            assert self.dmin is not None and self.dmin.shape == (rows, supers) and self.dmin.dtype == torch.float16
            assert self.mins is not None and self.mins.shape == (rows, supers, fmt.subs)
            assert int(self.mins.min()) >= 0 and int(self.mins.max()) < 2 ** fmt.scale_bits, "minimums out of range"


def dequantize(blocks: KBlocks) -> torch.Tensor:
    """float32 [rows, cols], with ggml's order of operations: (d * scale) * code - (dmin * min)."""
    fmt = blocks.fmt
    rows, cols = blocks.codes.shape
    shape = (rows, cols // SUPER, fmt.subs, 1)
    step = (blocks.d.float().unsqueeze(-1) * (blocks.scales.float() - fmt.scale_offset)).reshape(shape)
    codes = (blocks.codes.float() - fmt.code_offset).reshape(rows, cols // SUPER, fmt.subs, fmt.sub)
    weights = step * codes
    if fmt.has_min:
        weights = weights - (blocks.dmin.float().unsqueeze(-1) * blocks.mins.float()).reshape(shape)
    return weights.reshape(rows, cols)


# --- bytes -------------------------------------------------------------------------------------------------------


def _pack_bits(values: np.ndarray, bits: int, lanes: int) -> np.ndarray:
    """[..., lanes * width] small integers -> [..., width] bytes: lane k's value at column l in bits k*bits of
    byte l (ggml's layout: the k-th run of ``width`` weights goes to the k-th bit field of the same bytes)."""
    width = values.shape[-1] // lanes
    lanes_first = values.reshape(*values.shape[:-1], lanes, width).astype(np.uint16)
    packed = np.zeros((*values.shape[:-1], width), dtype=np.uint16)
    for k in range(lanes):
        packed |= lanes_first[..., k, :] << (k * bits)
    return packed.astype(np.uint8)


def _f16_bytes(values: torch.Tensor) -> np.ndarray:
    return values.numpy().astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def _scale_bytes_k4(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: eight 6-bit scales and minimums in 12 bytes (the inverse of ggml's get_scale_min_k4)."""
    sc, m = scales.astype(np.uint8), mins.astype(np.uint8)
    out = np.empty((*sc.shape[:-1], 12), dtype=np.uint8)
    out[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = (m[..., 0:4] & 63) | ((m[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 0xF) | ((m[..., 4:8] & 0xF) << 4)
    return out


def _scale_bytes_q3(scales: np.ndarray) -> np.ndarray:
    """Q3_K: sixteen 6-bit scales in 12 bytes: low nibbles of 0-7 and 8-15 in bytes 0-7, the high two bits of
    scale k*4 + j in bits 2k of byte 8 + j."""
    s = scales.astype(np.uint8)
    low = (s[..., 0:8] & 0xF) | ((s[..., 8:16] & 0xF) << 4)
    high = _pack_bits((s >> 4) & 3, 2, 4)
    return np.concatenate([low, high], axis=-1)


def encode(blocks: KBlocks) -> np.ndarray:
    """uint8 [rows, cols / 256 * block_bytes]: each super-block as ggml stores it."""
    blocks.check()
    fmt = blocks.fmt
    rows, cols = blocks.codes.shape
    n = rows * (cols // SUPER)
    codes = blocks.codes.numpy().astype(np.uint8).reshape(n, SUPER)
    scales = blocks.scales.numpy().reshape(n, fmt.subs)
    d = _f16_bytes(blocks.d.reshape(n))
    if fmt.has_min:
        dmin = _f16_bytes(blocks.dmin.reshape(n))
        mins = blocks.mins.numpy().reshape(n, fmt.subs)
    if fmt.name == "q2_k":
        qs = _pack_bits(codes.reshape(n, 2, 128), 2, 4).reshape(n, 64)
        parts = [(scales.astype(np.uint8) & 0xF) | (mins.astype(np.uint8) << 4), qs, d, dmin]
    elif fmt.name == "q3_k":
        hmask = _pack_bits(codes >> 2, 1, 8)
        qs = _pack_bits((codes & 3).reshape(n, 2, 128), 2, 4).reshape(n, 64)
        parts = [hmask, qs, _scale_bytes_q3(scales), d]
    elif fmt.name in ("q4_k", "q5_k"):
        low = _pack_bits((codes & 0xF).reshape(n, 4, 64), 4, 2).reshape(n, 128)
        high = [_pack_bits(codes >> 4, 1, 8)] if fmt.name == "q5_k" else []
        parts = [d, dmin, _scale_bytes_k4(scales, mins), *high, low]
    elif fmt.name == "q6_k":
        halves = codes.reshape(n, 2, 128)
        ql = _pack_bits(halves & 0xF, 4, 2).reshape(n, 128)
        qh = _pack_bits(halves >> 4, 2, 4).reshape(n, 64)
        parts = [ql, qh, scales.astype(np.int8).view(np.uint8), d]
    else:
        raise ValueError(f"unknown K format {fmt.name}")
    packed = np.concatenate(parts, axis=-1)
    assert packed.shape[-1] == fmt.block_bytes
    return packed.reshape(rows, -1)


# --- a plain rounding into the format ------------------------------------------------------------------------------


def fit_minmax(weight: torch.Tensor, fmt: KFormat) -> KBlocks:
    """Round-to-nearest into ``fmt`` from each sub-block's range: the sub-block's step (and minimum) rounded to the
    format's bits under the super-block's largest one. A reference grid (the tests' real weights): the format's
    bytes and dequantization do not depend on how the grid was chosen."""
    weight = weight.detach().float()
    rows, cols = weight.shape
    w = weight.reshape(rows, cols // SUPER, fmt.subs, fmt.sub)
    levels = 2 ** fmt.code_bits - 1
    if fmt.has_min:
        low = w.amin(-1).clamp(max=0)
        step = (w.amax(-1) - low).clamp(min=1e-12) / levels
        scale_levels = 2 ** fmt.scale_bits - 1
        d = (step.amax(-1) / scale_levels).to(torch.float16)
        dmin = ((-low).amax(-1) / scale_levels).to(torch.float16)
        scales = torch.where(d.float().unsqueeze(-1) > 0, (step / d.float().unsqueeze(-1)).round(),
                             torch.zeros_like(step)).clamp(0, scale_levels)
        mins = torch.where(dmin.float().unsqueeze(-1) > 0, (-low / dmin.float().unsqueeze(-1)).round(),
                           torch.zeros_like(low)).clamp(0, scale_levels)
        real_step = (d.float().unsqueeze(-1) * scales).unsqueeze(-1)
        real_min = (dmin.float().unsqueeze(-1) * mins).unsqueeze(-1)
        codes = torch.where(real_step > 0, ((w + real_min) / real_step).round(), torch.zeros_like(w))
        codes = codes.clamp(0, levels)
        return KBlocks(fmt, codes.reshape(rows, cols).to(torch.int32), d, scales.to(torch.int32), dmin,
                       mins.to(torch.int32))
    half = fmt.code_offset
    step = w.abs().amax(-1) / max(half, 1)
    if fmt.signed_scales:
        d = (step.amax(-1) / 127).to(torch.float16)
        scales = torch.where(d.float().unsqueeze(-1) > 0, (step / d.float().unsqueeze(-1)).round(),
                             torch.zeros_like(step)).clamp(-128, 127)
        stored = scales
    else:
        d = (step.amax(-1) / (2 ** (fmt.scale_bits - 1) - 1)).to(torch.float16)
        scales = torch.where(d.float().unsqueeze(-1) > 0, (step / d.float().unsqueeze(-1)).round(),
                             torch.zeros_like(step)).clamp(-fmt.scale_offset, fmt.scale_offset - 1)
        stored = scales + fmt.scale_offset
    real_step = (d.float().unsqueeze(-1) * scales).unsqueeze(-1)
    codes = torch.where(real_step != 0, (w / real_step).round(), torch.zeros_like(w)).clamp(-half, half - 1) + half
    return KBlocks(fmt, codes.reshape(rows, cols).to(torch.int32), d, stored.to(torch.int32))
