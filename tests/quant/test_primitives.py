import pytest
import torch

from compress.quant.primitives import (QuantizedWeight, dequantize, find_grid, num_groups, pack_rows, pack_weight,
                                       quantize_codes, unpack_rows, unpack_weight)


def reference_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-by-bit reference of the GPTQ stream layout: value k of each 32 at stream bit k*bits."""
    n, cols = values.shape
    out = torch.zeros(n * bits // 32, cols, dtype=torch.int64)
    for c in range(cols):
        for chunk in range(n // 32):
            for k in range(32):
                v = int(values[chunk * 32 + k, c])
                for b in range(bits):
                    if v >> b & 1:
                        pos = k * bits + b
                        out[chunk * bits + pos // 32, c] |= 1 << (pos % 32)
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_reference_layout_and_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (64, 5), generator=g)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 5)
    assert torch.equal(packed, reference_pack(values, bits))
    assert torch.equal(unpack_rows(packed, bits), values.to(torch.int32))


def test_four_bit_packing_is_nibbles_low_first():
    values = torch.arange(32).remainder(16).reshape(32, 1)
    packed = pack_rows(values, 4)
    assert int(packed[0, 0]) & 0xF == 0 and (int(packed[0, 0]) >> 4) & 0xF == 1
    assert (int(packed[1, 0]) & 0xFFFFFFFF) >> 28 == 15


def test_pack_rejects_rows_not_multiple_of_32():
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(40, 2, dtype=torch.int64), 4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_pack_weight_round_trip_exact(bits, sym):
    g = torch.Generator().manual_seed(0)
    out, inp, gs = 64, 96, 64  # 96 columns at group 64: a partial last group
    grid = [find_grid(torch.randn(out, gs, generator=g), bits, sym) for _ in range(num_groups(inp, gs))]
    qw = QuantizedWeight(codes=torch.randint(0, 2**bits, (out, inp), generator=g).to(torch.int32),
                         scale=torch.stack([gr.scale for gr in grid]), zero=torch.stack([gr.zero for gr in grid]),
                         g_idx=(torch.arange(inp) // gs).to(torch.int32), bits=bits)
    packed = pack_weight(qw)
    back = unpack_weight(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits)
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.zero, qw.zero)
    assert torch.equal(back.scale, qw.scale)  # scales are fp16-exact by construction
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_grid_properties():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    sym = find_grid(w, 4, sym=True)
    assert torch.all(sym.zero == 8)
    assert torch.equal(sym.scale, sym.scale.half().float())
    # An all-positive row keeps its full range under a symmetric grid (no clipping at half).
    positive = torch.full((1, 8), 0.5)
    grid = find_grid(positive, 8, sym=True)
    assert torch.allclose(grid.scale * (quantize_codes(positive, grid.scale[:, None], grid.zero[:, None], 8)
                                        - grid.zero[:, None]), positive, atol=1e-2)
    asym = find_grid(w, 4, sym=False)
    # Zero stays exactly representable: each zero point is an integer code of the grid, and the library's own
    # rounding sends 0.0 to it and back to exactly 0.0.
    assert torch.equal(asym.zero, asym.zero.round()) and torch.all((asym.zero >= 0) & (asym.zero <= 15))
    codes = quantize_codes(torch.zeros(3, 1), asym.scale[:, None], asym.zero[:, None], 4)
    assert torch.equal(codes[:, 0].float(), asym.zero.float())
    assert torch.equal(asym.scale[:, None] * (codes - asym.zero[:, None]), torch.zeros(3, 1))
    assert torch.all(asym.scale > 0)  # an all-zero row still gets a usable grid


def test_dequantize_uses_group_of_each_column():
    codes = torch.tensor([[0, 1, 2, 3]], dtype=torch.int32)
    scale = torch.tensor([[1.0], [10.0]])
    zero = torch.tensor([[0.0], [1.0]])
    g_idx = torch.tensor([1, 0, 1, 0], dtype=torch.int32)
    assert dequantize(codes, scale, zero, g_idx).tolist() == [[-10.0, 1.0, 10.0, 3.0]]


def test_num_groups_partial_last_group():
    assert num_groups(576, 128) == 5
    assert num_groups(512, 128) == 4
    assert num_groups(576, -1) == 1
