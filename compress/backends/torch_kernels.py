"""Layers that run our packed INT4/INT8 weights through torch's fused low-bit matmuls on the CPU.

* Int4PackedLinear: ``torch._weight_int4pack_mm_for_cpu`` (weight-only int4 with per-group scale and
  float zero, bfloat16 activations). Act-order checkpoints get their input columns permuted so each
  group is contiguous; a width that is not a multiple of the group (SmolLM2's 576 at g128) runs with
  smaller kernel groups that repeat our scales, where GPTQModel's CPU path refuses it.
* Int8PackedLinear: ``torch._weight_int8pack_mm`` (weight-only int8, one scale per output row).

Both keep only the kernel's operands: the GPTQ-layout tensors are not kept beside them.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.backends.packing import int4_operands, int8_operands
from compress.quant.linear import QuantLinear

_INNER_K_TILES = 2  # operand tiling of the CPU int4 kernel


class Int4PackedLinear(nn.Module):
    kernel = "_weight_int4pack_mm_for_cpu"

    def __init__(self, layer: QuantLinear, dtype: torch.dtype) -> None:
        super().__init__()
        ops = int4_operands(layer.quantized_weight(), layer.group_size)
        self.in_features, self.out_features, self.bits = layer.in_features, layer.out_features, 4
        self.kernel_group = ops.kernel_group
        self.dtype = dtype
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(ops.codes.cpu(), _INNER_K_TILES))
        self.register_buffer("scale_and_zero", ops.scale_and_zero.to(dtype))
        self.register_buffer("permutation", ops.permutation)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.to(dtype))

    def logical_weight_count(self) -> int:
        return self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(self.dtype)
        if self.permutation is not None:
            x = x.index_select(1, self.permutation)
        y = torch._weight_int4pack_mm_for_cpu(x, self.packed, self.kernel_group, self.scale_and_zero)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kernel group={self.kernel_group}, "
                f"act-order permutation={self.permutation is not None}")


class Int8PackedLinear(nn.Module):
    kernel = "_weight_int8pack_mm"

    def __init__(self, layer: QuantLinear, dtype: torch.dtype) -> None:
        super().__init__()
        ops = int8_operands(layer.quantized_weight())
        self.in_features, self.out_features, self.bits = layer.in_features, layer.out_features, 8
        self.dtype = dtype
        self.register_buffer("codes", ops.codes)
        self.register_buffer("scale", ops.scale.to(dtype))
        self.register_buffer("offset", None if ops.offset is None else ops.offset.to(dtype))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.to(dtype))

    def logical_weight_count(self) -> int:
        return self.in_features * self.out_features

    def embedding_rows(self, ids: torch.Tensor) -> torch.Tensor:
        rows = ids.long()
        out = self.codes[rows].float() * self.scale[rows].float().unsqueeze(-1)
        if self.offset is not None:
            out = out + self.offset[rows].float().unsqueeze(-1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(self.dtype)
        y = torch._weight_int8pack_mm(x, self.codes, self.scale)
        if self.offset is not None:
            y = y + x.sum(dim=1, keepdim=True) * self.offset
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, offset={self.offset is not None}"
