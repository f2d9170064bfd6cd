"""Our codes as ggml blocks: read back and dequantized by the gguf package, they are our weights."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from compress.errors import UserError
from compress.export_gguf.blocks import BLOCK_TYPES, encode
from compress.quant.gptq import GPTQConfig, gptq_quantize
from compress.quant.rtn import RTNConfig, rtn_quantize

GGML = {"q4_0": GGMLQuantizationType.Q4_0, "q4_1": GGMLQuantizationType.Q4_1, "q8_0": GGMLQuantizationType.Q8_0}
GRIDS = {"q4_0": (4, True), "q4_1": (4, False), "q8_0": (8, True)}


def weight(seed=0, rows=64, cols=256):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[:8] = w[:8].abs() + 0.01  # one-signed rows: zero points at the ends of the range
    return w


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_blocks_dequantize_to_our_weights(kind, method):
    bits, sym = GRIDS[kind]
    w = weight()
    if method == "rtn":
        qw = rtn_quantize(w, RTNConfig(bits, 32, sym=sym, scale_search="mse"))
    else:
        x = torch.randn(512, w.shape[1], generator=torch.Generator().manual_seed(1))
        qw = gptq_quantize(w, 2 * x.t() @ x / 512, GPTQConfig(bits, 32, sym=sym, act_order=False))
    blocks = encode(qw, BLOCK_TYPES[kind])
    assert blocks.shape == (64, 256 // 32 * BLOCK_TYPES[kind].bytes_per_block) and blocks.dtype == np.uint8
    theirs = torch.from_numpy(dequantize(blocks, GGML[kind]).reshape(w.shape))
    ours = qw.dequantize()
    if kind == "q4_1":
        # m = -z * s is rounded to fp16: half an fp16 ulp of m, which is up to 15 steps: 15 * 2^-11 = 0.0073 step.
        step = qw.scale.t().repeat_interleave(32, dim=1)
        assert float(((theirs - ours).abs() / step).max()) < 0.0074
    else:
        assert torch.equal(theirs, ours)


def test_act_order_groups_and_other_grids_are_refused_with_the_flags_that_fit():
    w = weight()
    x = torch.randn(512, w.shape[1], generator=torch.Generator().manual_seed(1))
    act = gptq_quantize(w, 2 * x.t() @ x / 512, GPTQConfig(4, 32, sym=True, act_order=True, static_groups=False, group_aware=False))
    with pytest.raises(UserError, match="--group-size 32 --sym --no-act-order"):
        encode(act, BLOCK_TYPES["q4_0"])
    with pytest.raises(UserError, match="asymmetric zero points"):
        encode(rtn_quantize(w, RTNConfig(4, 32, sym=False)), BLOCK_TYPES["q4_0"])
    with pytest.raises(UserError, match="q4_1 holds 4-bit"):
        encode(rtn_quantize(w, RTNConfig(8, 32, sym=False)), BLOCK_TYPES["q4_1"])
    with pytest.raises(UserError, match="not 32 consecutive"):
        encode(rtn_quantize(w, RTNConfig(4, 128, sym=False)), BLOCK_TYPES["q4_1"])
