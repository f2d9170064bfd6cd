"""ggml's K-quant blocks: the bytes we write are read back by the gguf package's own dequantizers and by ggml's own
(llama.cpp's libggml-base) as our float32 weights, bit for bit, for random blocks and for real weights."""

import importlib.util

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from compress.export_gguf.kquants import (KFORMATS, LEGACY_FORMATS, SUPER, KBlocks, dequantize as our_dequantize,
                                          encode, fit_weighted)
from tests.export_gguf.ggml_ref import ggml_dequantize

FORMATS = {**KFORMATS, **LEGACY_FORMATS}
GGML = {name: getattr(GGMLQuantizationType, name.upper()) for name in FORMATS}


def random_blocks(name: str, rows: int, cols: int, seed: int = 0) -> KBlocks:
    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(seed)
    subs = fmt.subs

    def ints(low, high, *shape):
        return torch.randint(low, high, shape, generator=g, dtype=torch.int32)

    scale_low, scale_high = (-128, 128) if fmt.signed_scales else (0, 2 ** fmt.scale_bits) if fmt.two_level else (1, 2)
    supers = cols // fmt.block
    d = (torch.rand(rows, supers, generator=g) * 0.01).to(torch.float16)
    blocks = KBlocks(fmt, ints(0, 2 ** fmt.code_bits, rows, cols), d, ints(scale_low, scale_high, rows, supers, subs))
    if fmt.has_min:
        blocks.dmin = (torch.rand(rows, supers, generator=g) * 0.01).to(torch.float16)
        blocks.mins = ints(*((0, 2 ** fmt.scale_bits) if fmt.two_level else (1, 2)), rows, supers, subs)
    return blocks


def read_back(blocks: KBlocks) -> torch.Tensor:
    """The gguf package's reading of our bytes, checked equal to ggml's own where llama.cpp is installed."""
    data = encode(blocks)
    rows, cols = blocks.codes.shape
    assert data.shape == (rows, cols // blocks.fmt.block * blocks.fmt.block_bytes) and data.dtype == np.uint8
    theirs = dequantize(data, GGML[blocks.fmt.name]).astype(np.float32).reshape(rows, cols)
    if importlib.util.find_spec("llama_cpp") is not None:
        assert np.array_equal(ggml_dequantize(blocks.fmt.name, data, cols), theirs)
    return torch.from_numpy(theirs)


@pytest.mark.parametrize("name", list(FORMATS))
def test_random_blocks_read_back_bit_for_bit(name):
    blocks = random_blocks(name, rows=6, cols=3 * SUPER)
    assert torch.equal(read_back(blocks), our_dequantize(blocks))


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_code_and_scale_value_lands_in_its_place(name):
    """One block per stored value: each code value in every position, each scale value in every sub-block, so a
    bit that landed in a neighbour's field shows."""
    fmt = FORMATS[name]
    for seed in range(4):
        blocks = random_blocks(name, rows=2 ** fmt.code_bits, cols=SUPER, seed=seed)
        blocks.codes = (torch.arange(2 ** fmt.code_bits, dtype=torch.int32).unsqueeze(1)
                        + torch.arange(SUPER, dtype=torch.int32)) % 2 ** fmt.code_bits
        assert torch.equal(read_back(blocks), our_dequantize(blocks)), seed


@pytest.mark.parametrize("name", list(FORMATS))
def test_real_shaped_weights_round_into_the_format_and_back(name):
    """Weights of a real model's spread (heavy-tailed rows, a few outlier columns) fitted into the format: the
    bytes read back as the grid's weights, and more bits cost less error."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 2 * SUPER, generator=g) * torch.rand(64, 1, generator=g)
    weight[:, 7] *= 8
    blocks = fit_weighted(weight, FORMATS[name])
    ours = our_dequantize(blocks)
    assert torch.equal(read_back(blocks), ours)
    error = float((ours - weight).norm() / weight.norm())
    ceiling = {"q2_k": 0.3, "q3_k": 0.17, "q4_k": 0.08, "q5_k": 0.04, "q6_k": 0.02, "q4_0": 0.1, "q4_1": 0.08,
               "q5_0": 0.05, "q5_1": 0.04, "q8_0": 0.007}[name]
    assert error < ceiling, error


def test_a_width_that_is_not_a_multiple_of_256_is_refused():
    blocks = random_blocks("q4_k", rows=2, cols=SUPER)
    blocks.codes = torch.zeros(2, 576, dtype=torch.int32)
    with pytest.raises(ValueError, match="576 columns are not a multiple of 256"):
        encode(blocks)


@pytest.mark.parametrize("name", list(FORMATS))
def test_the_weighted_fit_matches_or_beats_ggmls_own_rounding(name):
    """Our grid for the output error against llama.cpp's quantizer (ggml's quantize_q*_K) on the same real-shaped
    weights: without an importance it beats ggml's plain rounding by the plain error; given the inputs' mean
    squares it is within 1% of ggml's importance-matrix rounding by the error those weigh (seen: 0.1-6% better at
    Q2_K, Q3_K, Q5_K and Q6_K, 0.1% behind at Q4_K)."""
    from tests.export_gguf.ggml_ref import ggml_quantize

    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 2 * SUPER, generator=g) * torch.rand(64, 1, generator=g)
    weight[:, 7] *= 8
    importance = torch.rand(2 * SUPER, generator=g) ** 3 * 10

    def error(dequantized: torch.Tensor, by: torch.Tensor) -> float:
        return float(((dequantized - weight) ** 2 * by).sum() / (weight ** 2 * by).sum()) ** 0.5

    def ggmls(given):
        data = ggml_quantize(name, weight.numpy(), 2 * SUPER // fmt.block * fmt.block_bytes,
                             None if given is None else given.numpy())
        return torch.from_numpy(ggml_dequantize(name, data, weight.shape[1]))

    plain = fit_weighted(weight, fmt)
    assert torch.equal(read_back(plain), our_dequantize(plain))
    assert error(our_dequantize(plain), torch.ones(2 * SUPER)) < error(ggmls(None), torch.ones(2 * SUPER))
    weighted = fit_weighted(weight, fmt, importance)
    assert error(our_dequantize(weighted), importance) < 1.01 * error(ggmls(importance), importance)


@pytest.mark.parametrize("name", list(FORMATS))
def test_gptq_on_the_fixed_k_grids_costs_less_output_error(name):
    """The format's grids chosen first, GPTQ then choosing the codes on them: the bytes read back as its weights,
    and correlated inputs see less output error, tr(dW H dW^T), than from the weighted rounding on the same grids
    (0.73-0.82x seen)."""
    from compress.export_gguf.kquants import fit_gptq

    g = torch.Generator().manual_seed(0)
    cols = 2 * SUPER
    mixing = torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols ** 0.5
    inputs = torch.randn(4096, cols, generator=g) @ mixing * torch.rand(cols, generator=g) * 3
    hessian = inputs.t() @ inputs / inputs.shape[0]
    weight = torch.randn(64, cols, generator=g) * torch.rand(64, 1, generator=g)

    def output_error(blocks: KBlocks) -> float:
        delta = our_dequantize(blocks) - weight
        return float(torch.trace(delta @ hessian @ delta.t()))

    gptq = fit_gptq(weight, hessian, FORMATS[name])
    assert torch.equal(read_back(gptq), our_dequantize(gptq))
    assert output_error(gptq) < 0.85 * output_error(fit_weighted(weight, FORMATS[name], torch.diag(hessian)))
