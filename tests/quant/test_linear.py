import torch
import torch.nn.functional as F

from compress.quant.linear import QuantLinear
from compress.quant.rtn import RTNConfig, rtn_quantize


def test_forward_equals_dense_dequantized_and_state_dict_round_trips():
    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(64, 96, generator=g), torch.randn(64, generator=g)
    qw = rtn_quantize(w, RTNConfig(bits=3, group_size=64, sym=False))
    layer = QuantLinear.from_quantized(qw, 64, bias)
    x = torch.randn(2, 5, 96, generator=g)
    assert torch.equal(layer(x), F.linear(x, qw.dequantize(), bias))
    copy = QuantLinear(96, 64, 3, 64, bias=True, bias_dtype=bias.dtype)
    copy.load_state_dict(layer.state_dict())
    assert torch.equal(copy(x), layer(x))
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
