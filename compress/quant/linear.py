"""QuantLinear: a linear layer stored in a packed checkpoint layout, computed by dequantizing.

It holds exactly the tensors its checkpoint layout holds (GPTQ's qweight, qzeros, scales, g_idx or
compressed-tensors' weight_packed, weight_scale, weight_zero_point, weight_shape; and the bias), so a
model made of these saves to and loads from that format with a plain state dict. The forward pass
unpacks the weight to the activation dtype and calls ``F.linear``: simple and exact, not fast; fast
kernels are backends' business.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.quant.layouts import LAYOUTS
from compress.quant.primitives import QuantizedWeight, fake_quantize_tokens, fake_quantize_tokens_fp8

_WORD_BITS = 32


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 bias_dtype: torch.dtype = torch.float16, checkpoint_format: str = "gptq", sym: bool = False,
                 act_bits: int | None = None) -> None:
        super().__init__()
        self.checkpoint_format = checkpoint_format
        """The layout of its tensors (compress.quant.layouts): "gptq" (v1, zero points minus one), "gptq_v2" (as
        they are) or "compressed-tensors"."""
        self.layout = LAYOUTS[checkpoint_format]
        if in_features % _WORD_BITS or out_features % _WORD_BITS:
            raise ValueError(
                f"a {in_features}x{out_features} layer cannot be packed: packing needs both widths to be "
                "multiples of 32")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        """Symmetric grid: compressed-tensors then stores no zero points (they are 2**(bits-1))."""
        self.act_bits = act_bits
        """W8A8: the input is quantized per token to these bits first, as the checkpoint's kernels do."""
        for name, (shape, dtype) in self.layout.buffers(in_features, out_features, bits, group_size, sym).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        for name, value in self.layout.constants(in_features, out_features).items():
            getattr(self, name).copy_(value)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, group_size: int, bias: torch.Tensor | None,
                       checkpoint_format: str = "gptq", sym: bool = False, act_bits: int | None = None) -> "QuantLinear":
        out_features, in_features = qw.codes.shape
        layer = cls(in_features, out_features, qw.bits, group_size, bias is not None,
                    bias_dtype=bias.dtype if bias is not None else torch.float16, checkpoint_format=checkpoint_format,
                    sym=sym, act_bits=act_bits)
        layer.set_rows(0, out_features, qw)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def _packed(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in
                self.layout.buffers(self.in_features, self.out_features, self.bits, self.group_size, self.sym)}

    def set_rows(self, start: int, end: int, qw: QuantizedWeight) -> None:
        """Pack ``qw`` (output rows ``start:end``, multiples of 32) into the layer's buffers."""
        packed = self.layout.pack(qw, self.sym, self.group_size)
        for name, target in self.layout.rows(self._packed(), start, end, self.bits).items():
            target.copy_(packed[name])  # views into the buffers
        self._cache = None

    def quantized_weight(self) -> QuantizedWeight:
        return self.layout.unpack(self._packed(), self.bits, self.in_features, self.group_size)

    def _unpacked(self) -> QuantizedWeight:
        """Unpacking is the slow part of a forward pass, so the codes are unpacked once and kept as
        uint8 (1 byte per weight beside the packed 0.25-1) until new tensors are loaded."""
        cached = getattr(self, "_cache", None)
        if cached is None or cached.codes.device != getattr(self, self.layout.packed_name).device:
            qw = self.quantized_weight()
            qw.codes = qw.codes.to(torch.uint8)
            self._cache = cached = qw
        return cached

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def runtime_bytes(self) -> int:
        """Bytes of the unpacked uint8 codes kept after the first forward (memory benchmark)."""
        cached = getattr(self, "_cache", None)
        return 0 if cached is None else cached.codes.numel() * cached.codes.element_size()

    def logical_weight_count(self) -> int:
        return self.in_features * self.out_features

    def dequantized_weight(self) -> torch.Tensor:
        return self._unpacked().dequantize()

    def dequantized_rows(self, start: int, end: int) -> torch.Tensor:
        """Float32 rows ``start:end`` of the weight, unpacked from those output rows alone (both multiples of
        32, so packed zero points split on word boundaries for every bit width)."""
        rows = {name: t.contiguous() for name, t in self.layout.rows(self._packed(), start, end, self.bits).items()}
        return self.layout.unpack(rows, self.bits, self.in_features, self.group_size).dequantize()

    def embedding_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 rows ``ids`` of the weight (a tied embedding's lookup), dequantizing only those rows."""
        qw = self._unpacked()
        rows = ids.to(qw.codes.device).long()
        g = qw.g_idx.long()
        return (qw.codes[rows].float() - qw.zero.t()[rows][..., g]) * qw.scale.t()[rows][..., g]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:  # the kernel's own rounding: FP8 layouts' activations are FP8 too
            x = fake_quantize_tokens_fp8(x) if self.layout.float_codes else fake_quantize_tokens(x, self.act_bits)
        weight = self.dequantized_weight().to(device=x.device, dtype=x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}"
                + (f", act_bits={self.act_bits}" if self.act_bits else ""))
