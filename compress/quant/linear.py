"""QuantLinear: a linear layer stored in the GPTQ packed layout, computed by dequantizing.

It holds exactly the tensors a GPTQ checkpoint holds (qweight, qzeros, scales, g_idx, bias), so a
model made of these saves to and loads from that format with a plain state dict. The forward pass
unpacks the weight to the activation dtype and calls ``F.linear``: simple and exact, not fast; fast
kernels are backends' business.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.quant.primitives import QuantizedWeight, dequantize, num_groups, pack_weight, unpack_weight

_WORD_BITS = 32


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 bias_dtype: torch.dtype = torch.float16, checkpoint_format: str = "gptq") -> None:
        super().__init__()
        self.checkpoint_format = checkpoint_format
        """How qzeros holds the zero points: "gptq" (v1, minus one) or "gptq_v2" (as they are)."""
        if in_features % _WORD_BITS or out_features % _WORD_BITS:
            raise ValueError(
                f"a {in_features}x{out_features} layer cannot be packed: GPTQ packing needs both widths to be "
                "multiples of 32")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        groups = num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // _WORD_BITS, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // _WORD_BITS, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, group_size: int, bias: torch.Tensor | None,
                       checkpoint_format: str = "gptq") -> "QuantLinear":
        out_features, in_features = qw.codes.shape
        layer = cls(in_features, out_features, qw.bits, group_size, bias is not None,
                    bias_dtype=bias.dtype if bias is not None else torch.float16, checkpoint_format=checkpoint_format)
        for name, tensor in pack_weight(qw, checkpoint_format).items():
            getattr(layer, name).copy_(tensor)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def quantized_weight(self) -> QuantizedWeight:
        return unpack_weight(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.checkpoint_format)

    def _unpacked(self) -> QuantizedWeight:
        """Unpacking is the slow part of a forward pass, so the codes are unpacked once and kept as
        uint8 (1 byte per weight beside the packed 0.25-1) until new tensors are loaded."""
        cached = getattr(self, "_cache", None)
        if cached is None or cached.codes.device != self.qweight.device:
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
        qw = self._unpacked()
        return dequantize(qw.codes, qw.scale, qw.zero, qw.g_idx)

    def dequantized_rows(self, start: int, end: int) -> torch.Tensor:
        """Float32 rows ``start:end`` of the weight, unpacked from those output columns alone (both
        multiples of 32, so the packed zero points split on word boundaries for every bit width)."""
        words = slice(start * self.bits // _WORD_BITS, end * self.bits // _WORD_BITS)
        return unpack_weight(self.qweight[:, start:end].contiguous(), self.qzeros[:, words].contiguous(),
                             self.scales[:, start:end], self.g_idx, self.bits, self.checkpoint_format).dequantize()

    def embedding_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 rows ``ids`` of the weight (a tied embedding's lookup), dequantizing only those rows."""
        qw = self._unpacked()
        rows = ids.to(qw.codes.device).long()
        g = qw.g_idx.long()
        return (qw.codes[rows].float() - qw.zero.t()[rows][..., g]) * qw.scale.t()[rows][..., g]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight().to(device=x.device, dtype=x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
