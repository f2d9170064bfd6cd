"""MatMulNBits / GatherBlockQuantized operands hold exactly our codes, scales and zero points."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compress.backends.packing import NotPackable
from compress.ort.packing import nbits_dequantize, nbits_operands
from compress.quant.config import WeightQuantConfig
from compress.quant.rtn import rtn_quantize


@pytest.mark.parametrize("bits, group_size, sym", [(4, 128, True), (4, 128, False), (4, -1, True), (8, -1, True),
                                                   (8, 64, False), (4, 32, False)])
def test_operands_dequantize_to_our_weights(bits, group_size, sym):
    qw = rtn_quantize(torch.randn(24, 576), WeightQuantConfig(bits=bits, group_size=group_size, sym=sym))
    ops = nbits_operands(qw, group_size)
    assert ops.weight.dtype == np.uint8 and ops.weight.shape[:2] == (24, 576 // ops.block_size)
    assert ops.block_size >= 16 and ops.block_size & (ops.block_size - 1) == 0  # MatMulNBits: a power of two
    np.testing.assert_allclose(nbits_dequantize(ops, 576), qw.dequantize().numpy(), rtol=0, atol=1e-6)


def test_act_order_gets_a_permutation():
    torch.manual_seed(0)
    qw = rtn_quantize(torch.randn(8, 256), WeightQuantConfig(bits=4, group_size=64))
    order = torch.randperm(256)
    qw.codes, qw.g_idx = qw.codes[:, order], qw.g_idx[order]
    ops = nbits_operands(qw, 64)
    assert ops.permutation is not None
    np.testing.assert_allclose(nbits_dequantize(ops, 256), qw.dequantize().numpy()[:, ops.permutation], rtol=0,
                               atol=1e-6)


def test_three_bit_weights_are_refused():
    with pytest.raises(NotPackable, match="4- or 8-bit"):
        nbits_operands(rtn_quantize(torch.randn(8, 64), WeightQuantConfig(bits=3, group_size=32)), 32)
