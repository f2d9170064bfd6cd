"""The pure operand conversions for torch's int4/int8 matmuls, checked against our dequantization."""

from __future__ import annotations

import pytest
import torch

from compress.backends.packing import NotPackable, contiguous_groups, int4_operands, int8_operands, kernel_group
from compress.quant.config import WeightQuantConfig
from compress.quant.rtn import rtn_quantize


def kernel_dequant(ops) -> torch.Tensor:
    """What torch's int4 kernel computes per weight: (q - 8) * scale + zero, groups along the input."""
    g = torch.arange(ops.codes.shape[1]) // ops.kernel_group
    scale, zero = ops.scale_and_zero[..., 0].t()[:, g], ops.scale_and_zero[..., 1].t()[:, g]
    return (ops.codes.float() - 8) * scale + zero


@pytest.mark.parametrize("in_features, group_size, sym", [(576, 128, True), (576, 128, False), (1536, 128, True),
                                                          (576, -1, False), (256, 64, True), (96, 32, False)])
def test_int4_operands_reproduce_our_weights(in_features, group_size, sym):
    qw = rtn_quantize(torch.randn(48, in_features), WeightQuantConfig(bits=4, group_size=group_size, sym=sym))
    ops = int4_operands(qw, group_size)
    assert ops.permutation is None
    assert in_features % ops.kernel_group == 0
    torch.testing.assert_close(kernel_dequant(ops), qw.dequantize(), rtol=0, atol=1e-6)


def test_act_order_columns_are_permuted_into_contiguous_groups():
    torch.manual_seed(0)
    qw = rtn_quantize(torch.randn(32, 576), WeightQuantConfig(bits=4, group_size=128))
    shuffle = torch.randperm(576)  # an act-order checkpoint: column c of the file is column shuffle[c] here
    qw.codes, qw.g_idx = qw.codes[:, shuffle], qw.g_idx[shuffle]
    ops = int4_operands(qw, 128)
    assert ops.permutation is not None
    torch.testing.assert_close(kernel_dequant(ops), qw.dequantize()[:, ops.permutation], rtol=0, atol=1e-6)
    x = torch.randn(3, 576)
    torch.testing.assert_close(x[:, ops.permutation] @ kernel_dequant(ops).t(), x @ qw.dequantize().t(),
                               rtol=1e-4, atol=1e-4)


def test_kernel_groups_tile_our_groups_and_the_width():
    assert kernel_group(128, 576) == 64  # SmolLM2: 4 groups of 128 and a last one of 64
    assert kernel_group(128, 1536) == 128
    assert kernel_group(-1, 576) == 64
    assert kernel_group(256, 1024) == 256
    with pytest.raises(NotPackable):
        kernel_group(48, 96)


def test_groups_of_unequal_size_are_not_packable():
    g_idx = torch.tensor([0] * 20 + [1] * 44, dtype=torch.int32)
    with pytest.raises(NotPackable, match="unequal"):
        contiguous_groups(g_idx, 32)


@pytest.mark.parametrize("sym", [True, False])
def test_int8_operands_are_signed_codes_with_a_row_offset(sym):
    qw = rtn_quantize(torch.randn(40, 96) + (0 if sym else 0.5), WeightQuantConfig(bits=8, group_size=-1, sym=sym))
    ops = int8_operands(qw)
    assert ops.codes.dtype == torch.int8
    assert (ops.offset is None) == sym
    weight = ops.codes.float() * ops.scale[:, None] + (0 if ops.offset is None else ops.offset[:, None])
    torch.testing.assert_close(weight, qw.dequantize(), rtol=0, atol=1e-6)


def test_grouped_int8_and_wrong_bits_are_refused():
    with pytest.raises(NotPackable, match="group-size -1"):
        int8_operands(rtn_quantize(torch.randn(8, 256), WeightQuantConfig(bits=8, group_size=128)))
    with pytest.raises(NotPackable, match="not int4"):
        int4_operands(rtn_quantize(torch.randn(8, 64), WeightQuantConfig(bits=3, group_size=32)), 32)
