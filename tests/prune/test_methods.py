"""The weight-pruning methods as pure functions of (W, H, config), checked on matrices."""

import pytest
import torch

from compress.errors import UserError
from compress.prune.magnitude import MagnitudeConfig, magnitude_prune
from compress.prune.masks import Pattern
from compress.prune.sparsegpt import SparseGPTConfig, sparsegpt
from compress.prune.wanda import WandaConfig, input_norms_from_hessian, wanda_prune
from compress.quant.apply import output_error
from compress.quant.config import WeightQuantConfig
from compress.quant.gptq import GPTQConfig, gptq_quantize


def _problem(rows=64, cols=256, latent=200, seed=0):
    """A weight and the Hessian of correlated inputs with uneven feature scales (as in LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, latent, generator=g) @ torch.randn(latent, cols, generator=g)
    scales = torch.linspace(0.2, 3.0, cols)[torch.randperm(cols, generator=g)]  # loud features anywhere
    x = x * scales + 0.3 * torch.randn(4096, cols, generator=g)
    w = torch.randn(rows, cols, generator=g)
    return w, 2 * x.t() @ x / x.shape[0]


def _errors(pattern: str):
    w, h = _problem()
    mag, _ = magnitude_prune(w, MagnitudeConfig(pattern=pattern))
    wanda, _ = wanda_prune(w, input_norms_from_hessian(h), WandaConfig(pattern=pattern))
    cfg = SparseGPTConfig(pattern=pattern)
    sgpt = sparsegpt(w, h, cfg.sparsity, cfg.parsed_pattern).weight
    return {name: output_error(w, new, h) for name, new in (("magnitude", mag), ("wanda", wanda), ("sparsegpt", sgpt))}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_and_sparsegpt_output_error_is_below_magnitude(pattern):
    errors = _errors(pattern)
    assert errors["wanda"] < 0.9 * errors["magnitude"]
    assert errors["sparsegpt"] < 0.9 * errors["magnitude"]


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_sparsegpt_removes_exactly_its_quota_per_layer(sparsity):
    w, h = _problem(rows=48, cols=200)  # 200 columns: the last block is partial
    result = sparsegpt(w, h, sparsity, block_size=64)
    assert (~result.mask).sum().item() == int(sparsity * w.numel())
    assert torch.equal(result.weight == 0, ~result.mask)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_sparsegpt_n_m_keeps_n_in_every_group(n, m):
    w, h = _problem()
    result = sparsegpt(w, h, 1 - n / m, Pattern(n, m))
    zeros = (result.weight == 0).reshape(w.shape[0], -1, m).sum(-1)
    assert torch.all(zeros == m - n)


def test_sparsegpt_without_pruning_is_gptq():
    w, h = _problem()
    quant = WeightQuantConfig(bits=4, group_size=64)
    joint = sparsegpt(w, h, 0.0, quant=quant)
    gptq = gptq_quantize(w, h, GPTQConfig(bits=4, group_size=64, act_order=False, sym=quant.sym, scale_search="none"))
    assert torch.allclose(joint.weight, gptq.dequantize(), atol=1e-5)
    assert torch.equal(joint.quantized.codes, gptq.codes)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_joint_quantization_keeps_the_zeros_and_beats_prune_then_round(pattern):
    w, h = _problem()
    cfg = SparseGPTConfig(pattern=pattern)
    quant = WeightQuantConfig(bits=4, group_size=64)
    joint = sparsegpt(w, h, cfg.sparsity, cfg.parsed_pattern, quant=quant)
    dequantized = joint.quantized.dequantize()
    assert torch.equal(dequantized, joint.weight)
    assert torch.all(dequantized[~joint.mask] == 0)
    # Same mask, but quantized by plain rounding afterwards: the joint pass must be better.
    from compress.quant.rtn import rtn_quantize
    pruned = sparsegpt(w, h, cfg.sparsity, cfg.parsed_pattern).weight
    rounded = rtn_quantize(pruned, quant).dequantize()
    assert output_error(w, joint.weight, h) < output_error(w, rounded, h)


def test_fixed_mask_is_kept_through_quantization():
    w, h = _problem()
    _, mask = wanda_prune(w, input_norms_from_hessian(h), WandaConfig())
    result = sparsegpt(w, h, 0.5, fixed_mask=mask, quant=WeightQuantConfig(bits=4, group_size=64))
    assert torch.equal(result.mask, mask)
    assert torch.all(result.weight[~mask] == 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.0), r"outside \[0, 1\)"),
    (dict(sparsity=-0.1), r"outside \[0, 1\)"),
    (dict(pattern="2:4", sparsity=0.7), "always removes 50%"),
    (dict(pattern="5:4"), "0 < N < M"),
    (dict(pattern="half"), "unknown sparsity pattern"),
    (dict(comparison="global"), "unknown comparison"),
])
def test_bad_settings_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        WandaConfig(**kwargs)


def test_n_m_implies_its_sparsity():
    assert MagnitudeConfig(pattern="2:4").sparsity == 0.5
    assert MagnitudeConfig(pattern="1:4").sparsity == 0.75
    assert MagnitudeConfig().sparsity == 0.5
    assert SparseGPTConfig(pattern="4:8").tag == "4of8" and SparseGPTConfig(sparsity=0.6).tag == "s60"
