"""torch's fused int4/int8 layers compute what our reference QuantLinear computes, to bfloat16 precision."""

from __future__ import annotations

import pytest
import torch

from compress.backends.torch_kernels import Int4PackedLinear, Int8PackedLinear
from compress.quant.config import WeightQuantConfig
from compress.quant.linear import QuantLinear
from compress.quant.rtn import rtn_quantize


def layer(bits, group_size, sym, out_features=96, in_features=576, bias=True, shuffle=False):
    torch.manual_seed(0)
    qw = rtn_quantize(torch.randn(out_features, in_features), WeightQuantConfig(bits, group_size, sym))
    if shuffle:
        order = torch.randperm(in_features)
        qw.codes, qw.g_idx = qw.codes[:, order], qw.g_idx[order]
    return QuantLinear.from_quantized(qw, group_size, torch.randn(out_features) if bias else None)


def bf16_reference(ref: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The same weights as a dense bfloat16 F.linear: the precision the fused kernels can promise."""
    return torch.nn.functional.linear(x.bfloat16(), ref.dequantized_weight().bfloat16(),
                                      None if ref.bias is None else ref.bias.bfloat16()).float()


@pytest.mark.parametrize("group_size, sym, shuffle", [(128, True, False), (128, False, True), (-1, True, False),
                                                      (64, False, False)])
def test_int4_layer_agrees_with_quant_linear(group_size, sym, shuffle):
    ref = layer(4, group_size, sym, shuffle=shuffle)
    fast = Int4PackedLinear(ref, torch.bfloat16)
    x = torch.randn(2, 7, 576)
    expected = ref(x)
    got = fast(x.bfloat16()).float()
    assert got.shape == expected.shape
    bf16_error = (bf16_reference(ref, x) - expected).abs().max()
    # The kernel also holds its scales and float zeros in bfloat16: up to a few times dense bf16's error.
    assert (got - expected).abs().max() <= 3 * bf16_error + 1e-3


@pytest.mark.parametrize("sym", [True, False])
def test_int8_layer_agrees_with_quant_linear_and_gives_embedding_rows(sym):
    ref = layer(8, -1, sym, bias=False)
    fast = Int8PackedLinear(ref, torch.bfloat16)
    x = torch.randn(5, 576)
    expected = ref(x)
    bf16_error = (bf16_reference(ref, x) - expected).abs().max()
    assert (fast(x.bfloat16()).float() - expected).abs().max() <= 3 * bf16_error + 1e-3
    ids = torch.tensor([[0, 5], [95, 5]])
    torch.testing.assert_close(fast.embedding_rows(ids), ref.embedding_rows(ids), rtol=1e-2, atol=1e-2)
