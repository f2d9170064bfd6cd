import pytest
import torch

from compress.errors import UserError
from compress.quant.primitives import find_grid, max_code, pack_weight, unpack_weight
from compress.quant.rtn import RTNConfig, rtn_quantize
from compress.quant.scale_search import grid_error, search_grid


def with_outliers(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    spikes = torch.rand(rows, cols, generator=g) < 0.02
    return torch.where(spikes, w * 12, w)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_search_never_worse_than_min_max_on_any_row(bits, sym, weighted):
    for seed in range(4):
        w = with_outliers(64, 128, seed)
        importance = torch.rand(128, generator=torch.Generator().manual_seed(100 + seed)) ** 4 if weighted else None
        plain = grid_error(w, find_grid(w, bits, sym), bits, importance)
        searched = grid_error(w, search_grid(w, bits, sym, importance), bits, importance)
        assert torch.all(searched <= plain)
        if bits <= 4:  # a 4-16 level grid over a range set by 12-sigma spikes: clipping pays off
            assert searched.sum() < 0.97 * plain.sum()


def test_weighted_search_favours_the_columns_that_matter():
    w = with_outliers(64, 128, 0)
    importance = torch.ones(128)
    importance[:16] = 100.0
    by_mse = search_grid(w, 3, False)
    by_weight = search_grid(w, 3, False, importance)
    assert grid_error(w, by_weight, 3, importance).sum() < grid_error(w, by_mse, 3, importance).sum()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_zero_points_at_both_ends_round_trip_in_the_v2_layout(bits):
    """v1 stores zero - 1, so a zero point of 0 (a group whose weights share one sign) becomes the all-ones
    code; asymmetric checkpoints are written as v2, which stores every zero point as it is."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    w[:16] = w[:16].abs() + 0.01  # all positive: the zero point is 0
    w[16:32] = -w[16:32].abs()  # all negative: the zero point is the top code
    cfg = RTNConfig(bits, 64, sym=False)
    assert cfg.checkpoint_format == "gptq_v2"
    for search in ("none", "mse"):
        qw = rtn_quantize(w, RTNConfig(bits, 64, sym=False, scale_search=search))
        assert qw.zero[:, :16].min() == 0 and qw.zero[:, 16:32].max() == max_code(bits)
        packed = pack_weight(qw, "gptq_v2")
        back = unpack_weight(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits, "gptq_v2")
        assert torch.equal(back.zero, qw.zero) and torch.equal(back.codes, qw.codes)


def test_weighted_rtn_needs_calibration_and_unknown_search_is_refused():
    from compress.registry import get_method

    rtn = get_method("rtn")
    assert not rtn.needs_data(RTNConfig(scale_search="mse"))
    assert rtn.needs_data(RTNConfig(scale_search="weighted"))
    with pytest.raises(UserError, match="unknown scale search 'best'"):
        RTNConfig(scale_search="best")
