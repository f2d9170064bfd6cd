"""Weight pruning over whole tiny models of every seed architecture, on the shared layer-by-layer driver."""

import copy

import pytest
import torch

from compress.block_inputs import capture_block_inputs, collect_hessian, linear_call_groups
from compress.prune.apply import prune_layerwise
from compress.quant.apply import output_error
from compress.prune.config import KeptWeightsQuantConfig
from compress.quant.linear import QuantLinear
from compress.registry import get_prune_method
from compress.select import ModuleSelection, block_linears, find_blocks
from tests.conftest import ALL_ARCHS, calibration_ids

_models: dict = {}


def tiny(arch):
    """A private copy of the tiny model of ``arch`` (loaded once per session)."""
    if arch not in _models:
        from compress.models import load_model, resolve
        _models[arch] = load_model(resolve(f"tiny-{arch}").path)[0]
    return copy.deepcopy(_models[arch])


WINDOWS = calibration_ids(8, 48)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_every_layer_reaches_the_sparsity(arch, method):
    model = tiny(arch)
    m = get_prune_method(method)
    stats = prune_layerwise(model, m, m.config_cls(sparsity=0.5), WINDOWS, torch.device("cpu"), show_progress=False)
    _, blocks = find_blocks(model)
    expected = sum(len(block_linears(b, ModuleSelection())) for b in blocks)
    assert len(stats.layers) == expected
    for record in stats.layers:
        layer = model.get_submodule(record.name)
        zeros = (layer.weight == 0).float().mean().item()
        assert zeros == pytest.approx(0.5, abs=1e-9), record.name
        assert record.sparsity == pytest.approx(zeros)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_two_four_has_two_zeros_in_every_group(arch, method):
    model = tiny(arch)
    m = get_prune_method(method)
    stats = prune_layerwise(model, m, m.config_cls(pattern="2:4"), WINDOWS, torch.device("cpu"), show_progress=False)
    for record in stats.layers:
        weight = model.get_submodule(record.name).weight
        zeros = (weight == 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert torch.all(zeros >= 2), record.name


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_wanda_and_sparsegpt_layer_error_is_below_magnitude(arch):
    """On the same inputs (the dense model's first block), summed over the block's layers.

    A random model's activations are alike in every feature, where a trained LLM's are not (a few
    features are far louder): the block's norm weights get trained-like uneven scales first.
    """
    model = tiny(arch)
    _, blocks = find_blocks(model)
    block = blocks[0]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in block.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.nn.Parameter) and weight.dim() == 1:
                scales = torch.exp(1.5 * torch.randn(weight.shape, generator=g))
                if torch.all(weight == 0):  # Gemma's norms scale by 1 + weight, initialised at zero
                    weight.copy_(scales - 1)
                else:
                    weight.mul_(scales)
    inputs = capture_block_inputs(model, blocks, WINDOWS)
    linears = block_linears(block, ModuleSelection())
    errors = {"magnitude": 0.0, "wanda": 0.0, "sparsegpt": 0.0}
    for group in linear_call_groups(block, linears, inputs):
        hessian = collect_hessian(block, linears, group, inputs)
        for name in group:
            weight = linears[name].weight.data
            for method in errors:
                m = get_prune_method(method)
                new, _ = m.prune_weight(weight, hessian, m.config_cls(sparsity=0.5))
                errors[method] += output_error(weight, new, hessian)
    assert errors["wanda"] < errors["magnitude"]
    assert errors["sparsegpt"] < errors["magnitude"]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pruning_with_bits_packs_layers_that_keep_the_zeros(method):
    model = tiny("llama")
    m = get_prune_method(method)
    quant = KeptWeightsQuantConfig(bits=4, group_size=32)
    stats = prune_layerwise(model, m, m.config_cls(pattern="2:4"), WINDOWS, torch.device("cpu"), quant=quant,
                            show_progress=False)
    assert stats.quantized
    for record in stats.layers:
        layer = model.get_submodule(record.name)
        assert isinstance(layer, QuantLinear)
        weight = layer.quantized_weight().dequantize()
        zeros = (weight == 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert torch.all(zeros >= 2), record.name


def test_selection_limits_what_is_pruned():
    model = tiny("llama")
    m = get_prune_method("magnitude")
    stats = prune_layerwise(model, m, m.config_cls(), None, torch.device("cpu"),
                            ModuleSelection(exclude=["mlp.*"]), show_progress=False)
    assert stats.layers and all(".mlp." not in r.name for r in stats.layers)
    assert (model.model.layers[0].mlp.down_proj.weight != 0).all()
