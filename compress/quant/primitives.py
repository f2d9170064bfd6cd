"""Pure integer-quantization math: grids, quantize/dequantize, and the GPTQ bit packing.

Everything here works on plain tensors and knows nothing about models, so it is tested on random
matrices. Conventions follow the GPTQ checkpoint format that GPTQModel, transformers and vLLM read:

* a weight W has shape [out_features, in_features]; input column c belongs to group g_idx[c];
* per group and output row there is one scale and one integer zero point; w ~= scale * (q - zero);
* scales are rounded to fp16 when they are made, because the checkpoint stores them in fp16: the
  in-memory quantized model and the reloaded one then use bit-identical numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.quant.choices import SUPPORTED_BITS  # noqa: F401  (re-exported)

_WORD_BITS = 32


@dataclass
class QuantGrid:
    """Scale and zero point per (group, output row): both shaped [n_groups, out_features]."""

    scale: torch.Tensor  # float32, values exactly representable in fp16
    zero: torch.Tensor  # float32 holding integers in [0, 2**bits - 1]


@dataclass
class QuantizedWeight:
    """A quantized weight in the GPTQ layout, before packing."""

    codes: torch.Tensor  # int32 [out_features, in_features], values in [0, 2**bits - 1]
    scale: torch.Tensor  # float32 [n_groups, out_features]
    zero: torch.Tensor  # float32 [n_groups, out_features] (integers)
    g_idx: torch.Tensor  # int32 [in_features]
    bits: int
    damp_percent: float | None = None
    """Set when GPTQ had to dampen the Hessian more than asked (the value that worked)."""
    float_codes: bool = False
    """FP8: each code is the bit pattern of an E4M3 float (not an integer step), zero points are 0."""

    def dequantize(self) -> torch.Tensor:
        if self.float_codes:
            return dequantize_fp8(self.codes, self.scale, self.g_idx)
        return dequantize(self.codes, self.scale, self.zero, self.g_idx)


def max_code(bits: int) -> int:
    return 2**bits - 1


def num_groups(in_features: int, group_size: int) -> int:
    """Groups along the input dimension; the last one may be partial (e.g. 576 columns at g128 -> 5)."""
    if group_size == -1:
        return 1
    return -(-in_features // group_size)


def default_g_idx(in_features: int, group_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32, device=device)
    return (torch.arange(in_features, device=device) // group_size).to(torch.int32)


def find_grid(w: torch.Tensor, bits: int, sym: bool) -> QuantGrid:
    """Min/max grid per row of ``w`` ([rows, cols] -> scale/zero shaped [rows]).

    The range always contains 0 (as in GPTQ's quantizer), so exact zeros stay exact.
    Symmetric grids put the zero point in the middle of the code range.
    """
    w = w.float()
    return grid_from_range(w.min(dim=1).values, w.max(dim=1).values, bits, sym)


def grid_from_range(low: torch.Tensor, high: torch.Tensor, bits: int, sym: bool) -> QuantGrid:
    """The grid covering [low, high] per row, widened to contain 0 (a scale search shrinks the range
    and asks for the grid of each candidate)."""
    maxq = max_code(bits)
    xmin = torch.clamp(low.float(), max=0.0)
    xmax = torch.clamp(high.float(), min=0.0)
    if sym:
        # The range is always [-a, a]. (GPTQ's reference keeps xmin = 0 for all-positive rows, which
        # with the mid-range zero point clips them at half their maximum.)
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    # Round to fp16 now, as it will be stored; keep it strictly positive after the rounding.
    scale = scale.clamp(min=1e-7).half().float().clamp(min=torch.finfo(torch.float16).tiny)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return QuantGrid(scale=scale, zero=zero)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes for ``w`` on a grid broadcastable against it."""
    return torch.clamp(torch.round(w / scale) + zero, 0, max_code(bits))


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize, with the same arithmetic as :func:`dequantize`."""
    return scale * (quantize_codes(w, scale, zero, bits) - zero)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """[out, in] float32 weight from codes [out, in] and per-group scale/zero [n_groups, out]."""
    g = g_idx.long()
    s = scale.t()[:, g]  # [out, in]
    z = zero.t()[:, g]
    return s * (codes.float() - z)


def fake_quantize_tokens(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Activations quantized as a W8A8 kernel does as it runs (dynamic, per token, symmetric: one scale per row of
    the last dimension, absmax / 127 for 8 bits, codes rounded to nearest and saturated to [-128, 127]) and
    dequantized, in ``x``'s dtype."""
    top = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / top).clamp(min=torch.finfo(torch.float32).tiny)
    return (torch.round(xf / scale).clamp(-top - 1, top) * scale).to(x.dtype)


FP8_MAX = 448.0
"""The largest finite E4M3 value (torch.float8_e4m3fn)."""


def fp8_quantize(weight: torch.Tensor) -> QuantizedWeight:
    """FP8 E4M3 per output channel: scale = max|w| / 448 per row, codes the bit patterns of the rounded w / scale."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    values = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    codes = values.view(torch.uint8).to(torch.int32)
    return QuantizedWeight(codes=codes, scale=scale[None, :], zero=torch.zeros_like(scale[None, :]),
                           g_idx=default_g_idx(w.shape[1], -1, w.device), bits=8, float_codes=True)


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """[out, in] float32 weight from E4M3 bit patterns and per-group scales [n_groups, out]."""
    values = codes.to(torch.uint8).view(torch.float8_e4m3fn).float()
    return values * scale.t()[:, g_idx.long()]


def fake_quantize_tokens_fp8(x: torch.Tensor) -> torch.Tensor:
    """Activations quantized as a dynamic FP8 W8A8 kernel does (per token: scale max|x| / 448, values rounded to
    E4M3) and dequantized, in ``x``'s dtype."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return ((xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


# --- bit packing -------------------------------------------------------------------------------
# The GPTQ format packs 32 consecutive values into `bits` 32-bit words as one little-endian bit
# stream: value k occupies bits [k*bits, (k+1)*bits) of the stream. For 2, 4 and 8 bits no value
# crosses a word boundary; for 3 bits values 10 and 21 straddle two words (auto-gptq's layout).


def _stream_layout(bits: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For value k of 32: the word it starts in, its shift there, and how many of its bits spill over."""
    offsets = torch.arange(_WORD_BITS, device=device) * bits
    word, shift = offsets // _WORD_BITS, offsets % _WORD_BITS
    spill = torch.clamp(shift + bits - _WORD_BITS, min=0)
    return word, shift, spill


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 0: [n, cols] integers in [0, 2**bits) -> int32 [n * bits / 32, cols]."""
    n, cols = values.shape
    if n % _WORD_BITS:
        raise ValueError(f"cannot pack {n} rows at {bits} bits: the row count must be a multiple of 32")
    if _WORD_BITS % bits == 0:
        # No value straddles two words: OR each of the word's values in at its shift, in int32 (the
        # top value's bits wrap into the sign bit, which is the two's complement pattern we store).
        per_word = _WORD_BITS // bits
        v = values.to(torch.int32).reshape(n // per_word, per_word, cols)
        words = v[:, 0].clone()
        for k in range(1, per_word):
            words.bitwise_or_(v[:, k] << (k * bits))
        return words
    v = values.to(torch.int64).reshape(n // _WORD_BITS, _WORD_BITS, cols)
    words = torch.zeros(n // _WORD_BITS, bits + 1, cols, dtype=torch.int64, device=values.device)  # spare word: spills
    word, shift, spill = _stream_layout(bits, values.device)
    low = (v << shift.view(1, -1, 1)) & 0xFFFFFFFF
    high = torch.where(spill.view(1, -1, 1) > 0, v >> (bits - spill).view(1, -1, 1), torch.zeros_like(v))
    # Values never overlap in the stream, so summing their bit patterns into a word equals OR-ing them.
    words.index_add_(1, word, low)
    words.index_add_(1, word + 1, high)
    words = words[:, :bits].reshape(n // _WORD_BITS * bits, cols)
    # Reinterpret the unsigned 32-bit patterns as int32 (two's complement), as the format stores them.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 [n * bits / 32, cols] -> int32 [n, cols]."""
    rows, cols = packed.shape
    if _WORD_BITS % bits == 0:
        per_word = _WORD_BITS // bits
        shifts = torch.arange(0, _WORD_BITS, bits, dtype=torch.int32, device=packed.device)
        values = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & max_code(bits)  # arithmetic shift, then mask
        return values.reshape(rows * per_word, cols)
    words = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(rows // bits, bits, cols)
    words = torch.cat([words, torch.zeros_like(words[:, :1])], dim=1)  # spare word: spills read zeros
    word, shift, spill = _stream_layout(bits, packed.device)
    low = words[:, word] >> shift.view(1, -1, 1)
    high = words[:, word + 1] << (bits - spill).view(1, -1, 1)
    values = torch.where(spill.view(1, -1, 1) > 0, low | high, low) & max_code(bits)
    return values.reshape(rows // bits * _WORD_BITS, cols).to(torch.int32)


ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}
"""checkpoint_format -> what is subtracted from each zero point before it is packed. v1 ("gptq", the
auto-gptq layout every loader reads) stores zero - 1, so an asymmetric zero point of 0 (a group whose
weights share one sign) is written as the all-ones code, and a loader converting v1 to v2 by adding one
to every packed word carries into the neighbouring field; v2 stores the zero point itself."""


def pack_weight(qw: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """The four GPTQ tensors in ``checkpoint_format`` ("gptq" = v1 or "gptq_v2")."""
    stored_zeros = (qw.zero.to(torch.int64) - ZERO_OFFSETS[checkpoint_format]) & max_code(qw.bits)
    return {
        "qweight": pack_rows(qw.codes.t().contiguous(), qw.bits),
        "qzeros": pack_rows(stored_zeros.t().contiguous(), qw.bits).t().contiguous(),
        "scales": qw.scale.half(),
        "g_idx": qw.g_idx.to(torch.int32),
    }


def unpack_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                  bits: int, checkpoint_format: str = "gptq") -> QuantizedWeight:
    codes = unpack_rows(qweight, bits).t().contiguous()
    stored_zeros = unpack_rows(qzeros.t().contiguous(), bits).t()
    zero = ((stored_zeros.to(torch.int64) + ZERO_OFFSETS[checkpoint_format]) & max_code(bits)).float()
    return QuantizedWeight(codes=codes, scale=scales.float(), zero=zero, g_idx=g_idx.to(torch.int32), bits=bits)
