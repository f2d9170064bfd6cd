"""Pure math: ggml's K-quant blocks (Q2_K to Q6_K) as data, their exact dequantization, their bytes, and the codes
and grids chosen for them (``fit_weighted``: the grid for the least output error; ``fit_gptq``: GPTQ's codes on it).

A K block holds 256 weights of one row (a super-block) in sub-blocks of 16 or 32, each with its own scale (and,
in Q2_K, Q4_K and Q5_K, its own minimum) stored as a small integer under the super-block's float16 ``d`` (and
``dmin``). A weight is ``(d * scale) * code - (dmin * min)``, or ``(d * scale) * (code - offset)`` in the
symmetric formats, in that order of float32 operations: the order ggml's reference dequantizers use, so that our
float32 weights are theirs bit for bit.

Codes are held unsigned here: Q3_K's signed codes -4..3 as 0..7 and Q6_K's -32..31 as 0..63 (``code_offset``); Q3_K's
6-bit scales as 0..63 with their offset of 32 (``scale_offset``); Q6_K's int8 scales as they are. ``encode`` packs
them in ggml's byte layout (``block_q2_K`` ... ``block_q6_K`` in ggml-common.h), which the gguf package's
dequantizers and llama.cpp read.

The legacy blocks of 32 that a K file falls back to where a tensor's rows hold no K blocks (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0: ``LEGACY_FORMATS``) are held the same way with one level of scale, so one fit and one GPTQ serve every
tensor of a K file.
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
    block: int = SUPER
    """Weights per block: 256 for the K formats; 32 for the legacy ones, whose one level of scale is held as the
    block's float16 ``d`` (and ``dmin``) with every sub-block scale (and minimum) 1."""

    @property
    def subs(self) -> int:
        return self.block // self.sub

    @property
    def two_level(self) -> bool:
        return self.block == SUPER

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
LEGACY_FORMATS = {
    # the blocks of 32 that K file types fall back to where rows hold no K blocks (kmix.FALLBACK)
    "q4_0": KFormat("q4_0", 32, 4, 0, False, 18, code_offset=8, block=32),
    "q4_1": KFormat("q4_1", 32, 4, 0, True, 20, block=32),
    "q5_0": KFormat("q5_0", 32, 5, 0, False, 22, code_offset=16, block=32),
    "q5_1": KFormat("q5_1", 32, 5, 0, True, 24, block=32),
    "q8_0": KFormat("q8_0", 32, 8, 0, False, 34, code_offset=128, block=32),
}


@dataclass
class KBlocks:
    """One matrix in K blocks: ``rows`` x ``cols`` weights, ``cols`` a multiple of the format's block."""

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
        if cols % fmt.block:
            raise ValueError(f"{fmt.name}: {cols} columns are not a multiple of {fmt.block}")
        supers = cols // fmt.block
        low, high = (-128, 127) if fmt.signed_scales else (0, 2 ** fmt.scale_bits - 1) if fmt.two_level else (1, 1)
        assert self.d.shape == (rows, supers) and self.d.dtype == torch.float16
        assert self.scales.shape == (rows, supers, fmt.subs)
        assert int(self.codes.min()) >= 0 and int(self.codes.max()) < 2 ** fmt.code_bits, "codes out of range"
        assert low <= int(self.scales.min()) and int(self.scales.max()) <= high, "scales out of range"
        if fmt.has_min:
            assert self.dmin is not None and self.dmin.shape == (rows, supers) and self.dmin.dtype == torch.float16
            assert self.mins is not None and self.mins.shape == (rows, supers, fmt.subs)
            assert int(self.mins.min()) >= low and int(self.mins.max()) <= high, "minimums out of range"


def dequantize(blocks: KBlocks) -> torch.Tensor:
    """float32 [rows, cols], with ggml's order of operations: (d * scale) * code - (dmin * min)."""
    fmt = blocks.fmt
    rows, cols = blocks.codes.shape
    shape = (rows, cols // fmt.block, fmt.subs, 1)
    step = (blocks.d.float().unsqueeze(-1) * (blocks.scales.float() - fmt.scale_offset)).reshape(shape)
    codes = (blocks.codes.float() - fmt.code_offset).reshape(rows, cols // fmt.block, fmt.subs, fmt.sub)
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


def _fifth_bits(codes: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1: bit j of a little-endian 32-bit word is weight j's fifth bit."""
    bits = ((codes >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=-1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(-1, 4)


def encode(blocks: KBlocks) -> np.ndarray:
    """uint8 [rows, cols / 256 * block_bytes]: each super-block as ggml stores it."""
    blocks.check()
    fmt = blocks.fmt
    rows, cols = blocks.codes.shape
    n = rows * (cols // fmt.block)
    codes = blocks.codes.numpy().astype(np.uint8).reshape(n, fmt.block)
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
    elif fmt.name == "q8_0":
        parts = [d, (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    elif fmt.name in LEGACY_FORMATS:
        # Byte j holds weights j and j + 16 in its nibbles; Q5's fifth bits as one little-endian 32-bit word.
        nibbles = _pack_bits(codes & 0xF, 4, 2)
        high = [_fifth_bits(codes)] if fmt.code_bits == 5 else []
        # the _1 formats store the minimum itself (added), which is minus our offset
        minimum = [_f16_bytes(-blocks.dmin.reshape(n))] if fmt.has_min else []
        parts = [d, *minimum, *high, nibbles]
    else:
        raise ValueError(f"unknown K format {fmt.name}")
    packed = np.concatenate(parts, axis=-1)
    assert packed.shape[-1] == fmt.block_bytes
    return packed.reshape(rows, -1)


# --- the grid chosen for the output error ---------------------------------------------------------------------------

ROWS_PER_CHUNK = 256
"""Rows fitted at a time: the candidates' codes of one chunk are what the search holds (21 x 256 x cols floats)."""


def _least_squares_affine(x: torch.Tensor, codes: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block (last axis), the step s >= 0 and offset m <= 0 minimizing sum w (s * code + m - x)^2."""
    sw, sx = w.sum(-1), (w * x).sum(-1)
    sl, sl2, sxl = (w * codes).sum(-1), (w * codes * codes).sum(-1), (w * codes * x).sum(-1)
    det = sw * sl2 - sl * sl
    safe = det > 0
    det = torch.where(safe, det, torch.ones_like(det))
    step = torch.where(safe, (sw * sxl - sx * sl) / det, torch.zeros_like(det))
    offset = torch.where(safe, (sl2 * sx - sl * sxl) / det, torch.zeros_like(det))
    # A positive offset cannot be stored (the minimum is subtracted): refit the step through the origin then.
    through_zero = torch.where(sl2 > 0, sxl / sl2.clamp(min=1e-30), torch.zeros_like(sl2))
    step = torch.where(offset > 0, through_zero, step).clamp(min=0)
    offset = offset.clamp(max=0)
    return step, offset


def _affine_candidates(x: torch.Tensor, w: torch.Tensor, levels: int, steps: int = 60, low: float = -1.5,
                       delta: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sub-block's step and minimum (as a non-negative number subtracted) of least weighted error: codes from
    ``steps`` + 1 stretches of the sub-block's range, each refitted by least squares (ggml's make_qkx2 search,
    scored by the weights given, over a wider and finer set of stretches than its 21: on real-shaped weights this
    matches ggml's own importance-weighted rounding at Q4_K, where 21 stretches fall 1% short)."""
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    span = (x.amax(-1, keepdim=True) - lo).clamp(min=1e-30)
    best_error = torch.full(x.shape[:-1], float("inf"))
    best_step, best_offset = torch.zeros(x.shape[:-1]), torch.zeros(x.shape[:-1])
    for k in range(steps + 1):
        codes = ((levels + low + delta * k) / span * (x - lo)).round().clamp(0, levels)
        step, offset = _least_squares_affine(x, codes, w)
        error = (w * (step.unsqueeze(-1) * codes + offset.unsqueeze(-1) - x) ** 2).sum(-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_step = torch.where(better, step, best_step)
        best_offset = torch.where(better, offset, best_offset)
    return best_step, -best_offset


def _symmetric_candidates(x: torch.Tensor, w: torch.Tensor, half: int, steps: int = 30) -> torch.Tensor:
    """Each sub-block's signed step of least weighted error with codes -half .. half - 1: scales through the
    largest-magnitude weight, stretched by up to ``steps`` tenths of a level, each refitted (ggml's make_qx, whose
    9 tenths leave 5-7% more error than 30 on real-shaped weights)."""
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    peak = torch.where(peak == 0, torch.ones_like(peak), peak)
    best_score = torch.full(x.shape[:-1], -1.0)
    best_step = torch.zeros(x.shape[:-1])
    for k in range(-steps, steps + 1):
        codes = (-(half + 0.1 * k) / peak * x).round().clamp(-half, half - 1)
        sxl, sl2 = (w * x * codes).sum(-1), (w * codes * codes).sum(-1)
        score = torch.where(sl2 > 0, sxl * sxl / sl2.clamp(min=1e-30), torch.zeros_like(sl2))
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_step = torch.where(better, torch.where(sl2 > 0, sxl / sl2.clamp(min=1e-30), torch.zeros_like(sl2)),
                                best_step)
    return best_step


def _quantize_sub_scales(values: torch.Tensor, weight: torch.Tensor, top: int, signed: bool,
                         steps: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """The super-block's float16 scale d and each sub-block's integer multiple of it for ``values`` [..., subs]
    (steps or minimums): d through the largest one, stretched by up to ``steps`` tenths, keeping the d of least
    error weighted by ``weight`` (each sub-block's total importance)."""
    peak = values.abs().amax(-1, keepdim=True) if not signed else \
        values.gather(-1, values.abs().argmax(-1, keepdim=True))
    bottom = -top - 1 if signed else 0
    best_error = torch.full(values.shape[:-1], float("inf"))
    best_d = torch.zeros(values.shape[:-1], dtype=torch.float16)
    best_q = torch.zeros_like(values)
    for k in range(-steps, steps + 1):
        d = torch.where(peak != 0, peak / (top + 0.1 * k) if not signed else -peak / (top + 1 + 0.1 * k),
                        torch.zeros_like(peak)).to(torch.float16)
        real = d.float()
        q = torch.where(real != 0, values / real.where(real != 0, torch.ones_like(real)), torch.zeros_like(values))
        q = q.round().clamp(bottom, top)
        error = (weight * (real * q - values) ** 2).sum(-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_d = torch.where(better, d.squeeze(-1), best_d)
        best_q = torch.where(better.unsqueeze(-1), q, best_q)
    return best_d, best_q


def fit_weighted(weight: torch.Tensor, fmt: KFormat, importance: torch.Tensor | None = None) -> KBlocks:
    """``weight`` [rows, cols] into ``fmt`` for the least output error: each weight's error counts by the mean square
    of the input it multiplies (``importance`` [cols]: GPTQ's Hessian diagonal; ggml's importance matrix is the same
    statistic), plain squares where there is none. Each sub-block's step (and minimum) is searched on the weights
    and refitted by weighted least squares; the sub-block steps are then rounded under the super-block's float16
    scale by the same error, and the codes rounded on the grid that is stored."""
    rows, cols = weight.shape
    if cols % fmt.block:
        raise ValueError(f"{fmt.name}: {cols} columns are not a multiple of {fmt.block}")
    importance = torch.ones(cols) if importance is None else importance.detach().float().clamp(min=0)
    # A column no input reached still counts a little, so that its weights are not rounded arbitrarily.
    importance = importance + 1e-6 * importance.mean().clamp(min=1e-30)
    parts = [_fit_rows(weight[r:r + ROWS_PER_CHUNK].detach().float(), fmt, importance)
             for r in range(0, rows, ROWS_PER_CHUNK)]
    return KBlocks(fmt, torch.cat([p.codes for p in parts]), torch.cat([p.d for p in parts]),
                   torch.cat([p.scales for p in parts]),
                   torch.cat([p.dmin for p in parts]) if fmt.has_min else None,
                   torch.cat([p.mins for p in parts]) if fmt.has_min else None)


def _one_level(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A legacy block's float16 step (or minimum) itself as its ``d``, under a sub-block scale of 1."""
    return values.squeeze(-1).to(torch.float16), torch.ones_like(values)


def _fit_rows(weight: torch.Tensor, fmt: KFormat, importance: torch.Tensor) -> KBlocks:
    rows, cols = weight.shape
    x = weight.reshape(rows, cols // fmt.block, fmt.subs, fmt.sub)
    w = importance.reshape(1, cols // fmt.block, fmt.subs, fmt.sub).expand_as(x)
    sub_weight = w.sum(-1)
    levels = 2 ** fmt.code_bits - 1
    if fmt.has_min:
        step, minimum = _affine_candidates(x, w, levels)
        if fmt.two_level:
            top = 2 ** fmt.scale_bits - 1
            d, scales = _quantize_sub_scales(step, sub_weight, top, signed=False)
            dmin, mins = _quantize_sub_scales(minimum, sub_weight, top, signed=False)
        else:
            d, scales = _one_level(step)
            dmin, mins = _one_level(minimum)
        real_step = (d.float().unsqueeze(-1) * scales).unsqueeze(-1)
        real_min = (dmin.float().unsqueeze(-1) * mins).unsqueeze(-1)
        codes = torch.where(real_step > 0, (x + real_min) / real_step.where(real_step > 0, torch.ones_like(real_step)),
                            torch.zeros_like(x)).round().clamp(0, levels)
        return KBlocks(fmt, codes.reshape(rows, cols).to(torch.int32), d, scales.to(torch.int32), dmin,
                       mins.to(torch.int32))
    half = fmt.code_offset
    step = _symmetric_candidates(x, w, half)
    if fmt.two_level:
        top = 127 if fmt.signed_scales else fmt.scale_offset - 1
        d, scales = _quantize_sub_scales(step, sub_weight, top, signed=True)
    else:
        d, scales = _one_level(step)
    real_step = (d.float().unsqueeze(-1) * scales).unsqueeze(-1)
    codes = torch.where(real_step != 0, x / real_step.where(real_step != 0, torch.ones_like(real_step)),
                        torch.zeros_like(x)).round().clamp(-half, half - 1) + half
    stored = scales if fmt.signed_scales or not fmt.two_level else scales + fmt.scale_offset
    return KBlocks(fmt, codes.reshape(rows, cols).to(torch.int32), d, stored.to(torch.int32))


def grid_of(blocks: KBlocks) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sub-block's real step and offset ([rows, cols / sub]): a weight is ``step * code - offset``."""
    fmt = blocks.fmt
    rows = blocks.codes.shape[0]
    step = blocks.d.float().unsqueeze(-1) * (blocks.scales.float() - fmt.scale_offset)
    offset = blocks.dmin.float().unsqueeze(-1) * blocks.mins.float() if fmt.has_min else step * fmt.code_offset
    return step.reshape(rows, -1), offset.reshape(rows, -1)


def fit_gptq(weight: torch.Tensor, hessian: torch.Tensor, fmt: KFormat, damp_percent: float = 0.01) -> KBlocks:
    """``fit_weighted``'s grids (weighted by the Hessian's diagonal) fixed first, then GPTQ's error propagation
    choosing the codes on them (compress.quant.fixed_grid): the codes GPTQ picks are the codes written."""
    from compress.quant.fixed_grid import gptq_fixed_grid

    grid = fit_weighted(weight, fmt, torch.diag(hessian))
    step, offset = grid_of(grid)
    codes = gptq_fixed_grid(weight, hessian, step, offset, fmt.sub, 2 ** fmt.code_bits - 1, damp_percent)
    return KBlocks(fmt, codes, grid.d, grid.scales, grid.dmin, grid.mins)
