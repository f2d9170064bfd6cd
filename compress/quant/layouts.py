"""Pure conversions between a QuantizedWeight and the tensors a packed linear layer stores, one class per
on-disk layout. Nothing here knows about modules, files or configs: each layout says which buffers a layer of
a given shape holds, packs a weight into them (whole, or a range of output rows at a time, for a large head),
and unpacks them.

* ``gptq`` / ``gptq_v2``: qweight [in*bits/32, out] (codes packed along the input), qzeros [groups,
  out*bits/32] (zero points minus one in v1, as they are in v2), scales [groups, out] fp16, g_idx [in]. What
  GPTQModel, transformers (through GPTQModel) and vLLM's GPTQ paths read.
* ``compressed-tensors`` (format pack-quantized): weight_packed [out, in*bits/32] (the same bit stream, along
  each output row), weight_scale [out, groups], weight_zero_point [out*bits/32, groups] (asymmetric grids
  only: a symmetric grid's zero point is implied), weight_shape [2]. compressed-tensors stores signed codes
  ``q - 2**(bits-1)`` and packs them with that offset added back, so its packed words hold exactly our
  unsigned codes and zero points. Groups are contiguous input columns (no group index): vLLM reads it
  through its WNA16 kernels, transformers through the compressed-tensors package.
* ``int-quantized`` (compressed-tensors, W8A8): weight int8 [out, in] (signed codes ``q - 128``, one per byte),
  weight_scale [out, 1]; symmetric 8-bit grids, one per output channel. vLLM's int8 W8A8 kernels read it as it is.
* ``float-quantized`` (compressed-tensors, FP8 W8A8): weight float8_e4m3fn [out, in], weight_scale float32 [out, 1].
"""

from __future__ import annotations

from typing import Callable

import torch

from compress.quant.primitives import (ZERO_OFFSETS, QuantizedWeight, default_g_idx, num_groups, pack_rows, pack_weight,
                                       unpack_rows, unpack_weight)

_WORD_BITS = 32


class GPTQLayout:
    float_codes = False
    packed_name = "qweight"
    """The buffer that marks a packed layer in a checkpoint (``NAME.qweight``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def buffers(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool
                ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        groups = num_groups(in_features, group_size)
        return {"qweight": ((in_features * bits // _WORD_BITS, out_features), torch.int32),
                "qzeros": ((groups, out_features * bits // _WORD_BITS), torch.int32),
                "scales": ((groups, out_features), torch.float16),
                "g_idx": ((in_features,), torch.int32)}

    def constants(self, in_features: int, out_features: int) -> dict[str, torch.Tensor]:
        """Buffers fixed by the layer's shape alone (set once, not per row)."""
        return {}

    def features(self, shape_of: Callable[[str], tuple[int, ...]], bits: int) -> tuple[int, int]:
        """(in, out) features of a stored layer, from its tensors' shapes (``shape_of(buffer name)``)."""
        return shape_of("g_idx")[0], shape_of("scales")[1]

    def pack(self, qw: QuantizedWeight, sym: bool, group_size: int) -> dict[str, torch.Tensor]:
        return pack_weight(qw, self.name)

    def unpack(self, tensors: dict[str, torch.Tensor], bits: int, in_features: int, group_size: int
               ) -> QuantizedWeight:
        return unpack_weight(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits,
                             self.name)

    def rows(self, tensors: dict[str, torch.Tensor], start: int, end: int, bits: int) -> dict[str, torch.Tensor]:
        """The tensors of output rows ``start:end`` (multiples of 32, so packed zero points split on words); the group
        index is the whole layer's."""
        words = slice(start * bits // _WORD_BITS, end * bits // _WORD_BITS)
        return {"qweight": tensors["qweight"][:, start:end], "qzeros": tensors["qzeros"][:, words],
                "scales": tensors["scales"][:, start:end], "g_idx": tensors["g_idx"]}


class CompressedTensorsLayout:
    float_codes = False
    name = "compressed-tensors"
    packed_name = "weight_packed"

    def buffers(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool
                ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        groups = num_groups(in_features, group_size)
        layout = {"weight_packed": ((out_features, in_features * bits // _WORD_BITS), torch.int32),
                  "weight_scale": ((out_features, groups), torch.float16)}
        if not sym:
            layout["weight_zero_point"] = ((out_features * bits // _WORD_BITS, groups), torch.int32)
        layout["weight_shape"] = ((2,), torch.int64)
        return layout

    def constants(self, in_features: int, out_features: int) -> dict[str, torch.Tensor]:
        return {"weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64)}

    def features(self, shape_of: Callable[[str], tuple[int, ...]], bits: int) -> tuple[int, int]:
        rows, words = shape_of("weight_packed")
        return words * _WORD_BITS // bits, rows

    def pack(self, qw: QuantizedWeight, sym: bool, group_size: int) -> dict[str, torch.Tensor]:
        out_features, in_features = qw.codes.shape
        if not torch.equal(qw.g_idx.long().cpu(), default_g_idx(in_features, group_size).long()):
            raise ValueError("compressed-tensors stores groups of contiguous columns: quantize without a group "
                             "order (group-aware or static groups, or no act order)")
        if sym and not bool((qw.zero == 2 ** (qw.bits - 1)).all()):
            raise ValueError("a symmetric compressed-tensors layer needs every zero point at 2**(bits-1)")
        tensors = {"weight_packed": pack_rows(qw.codes.t().contiguous(), qw.bits).t().contiguous(),
                   "weight_scale": qw.scale.t().half().contiguous()}
        if not sym:
            tensors["weight_zero_point"] = pack_rows(qw.zero.t().to(torch.int32).contiguous(), qw.bits)
        return tensors | self.constants(in_features, out_features)

    def unpack(self, tensors: dict[str, torch.Tensor], bits: int, in_features: int, group_size: int
               ) -> QuantizedWeight:
        codes = unpack_rows(tensors["weight_packed"].t().contiguous(), bits).t().contiguous()
        scale = tensors["weight_scale"].t().float()
        zero_point = tensors.get("weight_zero_point")
        if zero_point is None:
            zero = torch.full_like(scale, float(2 ** (bits - 1)))
        else:
            zero = unpack_rows(zero_point, bits).t().float()
        g_idx = default_g_idx(in_features, group_size, codes.device)
        return QuantizedWeight(codes=codes, scale=scale.contiguous(), zero=zero.contiguous(), g_idx=g_idx, bits=bits)

    def rows(self, tensors: dict[str, torch.Tensor], start: int, end: int, bits: int) -> dict[str, torch.Tensor]:
        """The tensors of output rows ``start:end``; weight_shape is the layer's, not the rows'."""
        rows = {"weight_packed": tensors["weight_packed"][start:end], "weight_scale": tensors["weight_scale"][start:end]}
        if "weight_zero_point" in tensors:
            rows["weight_zero_point"] = tensors["weight_zero_point"][start * bits // _WORD_BITS:end * bits // _WORD_BITS]
        return rows


class IntQuantizedLayout:
    name = "int-quantized"
    packed_name = "weight_scale"
    """A float linear has a ``weight`` too: the scale is what marks this layout's layers."""
    float_codes = False
    weight_dtype = torch.int8
    scale_dtype = torch.float16
    _BITS = 8

    def buffers(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool
                ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if bits != self._BITS or group_size != -1 or not sym:
            raise ValueError(f"{self.name} layers hold symmetric 8-bit grids, one per output channel")
        return {"weight": ((out_features, in_features), self.weight_dtype),
                "weight_scale": ((out_features, 1), self.scale_dtype)}

    def constants(self, in_features: int, out_features: int) -> dict[str, torch.Tensor]:
        return {}

    def features(self, shape_of: Callable[[str], tuple[int, ...]], bits: int) -> tuple[int, int]:
        out_features, in_features = shape_of("weight")
        return in_features, out_features

    def _check(self, qw: QuantizedWeight) -> None:
        middle = 0 if self.float_codes else 2 ** (self._BITS - 1)
        if qw.bits != self._BITS or qw.float_codes != self.float_codes or qw.scale.shape[0] != 1 \
                or not bool((qw.zero == middle).all()):
            raise ValueError(f"{self.name} layers hold symmetric 8-bit grids, one per output channel")

    def pack(self, qw: QuantizedWeight, sym: bool, group_size: int) -> dict[str, torch.Tensor]:
        self._check(qw)
        return {"weight": (qw.codes - 2 ** (self._BITS - 1)).to(torch.int8),
                "weight_scale": qw.scale.t().to(self.scale_dtype).contiguous()}

    def unpack(self, tensors: dict[str, torch.Tensor], bits: int, in_features: int, group_size: int
               ) -> QuantizedWeight:
        codes = tensors["weight"].to(torch.int32) + 2 ** (self._BITS - 1)
        scale = tensors["weight_scale"].t().float().contiguous()
        return QuantizedWeight(codes=codes, scale=scale, zero=torch.full_like(scale, float(2 ** (self._BITS - 1))),
                               g_idx=default_g_idx(in_features, -1, codes.device), bits=self._BITS)

    def rows(self, tensors: dict[str, torch.Tensor], start: int, end: int, bits: int) -> dict[str, torch.Tensor]:
        return {"weight": tensors["weight"][start:end], "weight_scale": tensors["weight_scale"][start:end]}


class FloatQuantizedLayout(IntQuantizedLayout):
    """compressed-tensors float-quantized (FP8 W8A8): weight float8_e4m3fn [out, in], weight_scale float32 [out, 1]."""
    name = "float-quantized"
    float_codes = True
    weight_dtype = torch.float8_e4m3fn
    scale_dtype = torch.float32

    def pack(self, qw: QuantizedWeight, sym: bool, group_size: int) -> dict[str, torch.Tensor]:
        self._check(qw)
        return {"weight": qw.codes.to(torch.uint8).view(torch.float8_e4m3fn),
                "weight_scale": qw.scale.t().float().contiguous()}

    def unpack(self, tensors: dict[str, torch.Tensor], bits: int, in_features: int, group_size: int
               ) -> QuantizedWeight:
        codes = tensors["weight"].view(torch.uint8).to(torch.int32)
        scale = tensors["weight_scale"].t().float().contiguous()
        return QuantizedWeight(codes=codes, scale=scale, zero=torch.zeros_like(scale),
                               g_idx=default_g_idx(in_features, -1, codes.device), bits=self._BITS, float_codes=True)


LAYOUTS = {name: GPTQLayout(name) for name in ZERO_OFFSETS} | {"compressed-tensors": CompressedTensorsLayout(),
                                                                "int-quantized": IntQuantizedLayout(),
                                                                "float-quantized": FloatQuantizedLayout()}
"""Layout name (a QuantLinear's ``checkpoint_format``) -> how its tensors are packed."""
