"""Structured pruning: importance math on tensors, and smaller dense models of every seed architecture
that reload with from_pretrained, whose config matches their weights and whose outputs equal those of
the model with the same units zeroed."""

import copy

import pytest
import torch

from compress.errors import UserError
from compress.prune.structured import (StructuredConfig, block_influence, column_importance, expand, kept_units,
                                       removal_count, unit_importance)
from compress.registry import get_prune_method
from compress.select import ModuleSelection, find_blocks
from tests.conftest import ALL_ARCHS, calibration_ids, model_output

WINDOWS = calibration_ids(6, 32)
MLP_ARCHS = ["llama", "mistral", "falcon", "gptj", "gpt_neox", "opt", "bert", "llama3", "qwen2", "qwen3", "gemma2",
             "gemma3", "phi3"]  # Phi-3: its fused gate_up_proj loses each channel from both halves
HEAD_ARCHS = ["llama", "mistral"]
_models: dict = {}


def tiny(arch):
    if arch not in _models:
        from compress.models import load_model, resolve
        _models[arch] = load_model(resolve(f"tiny-{arch}").path)[0]
    return copy.deepcopy(_models[arch])


def structured(model, **kw):
    return get_prune_method("structured").apply(model, StructuredConfig(**kw), WINDOWS, torch.device("cpu"),
                                                ModuleSelection(), show_progress=False)


# --- pure math --------------------------------------------------------------------------------------


def test_column_importance_is_input_norm_times_column_norm():
    weight = torch.tensor([[3.0, 0.0, 1.0], [4.0, 2.0, 0.0]])
    sq_norms = torch.tensor([1.0, 100.0, 4.0])
    assert torch.allclose(column_importance(sq_norms, weight), torch.tensor([5.0, 20.0, 2.0]))


def test_units_sum_their_columns_and_the_lowest_go():
    scores = unit_importance(torch.tensor([1.0, 1.0, 5.0, 5.0, 0.5, 0.5]), 2)
    assert torch.equal(scores, torch.tensor([2.0, 10.0, 1.0]))
    assert kept_units(scores, 1).tolist() == [0, 1]
    assert expand(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]


def test_block_influence():
    h = torch.randn(2, 5, 8)
    assert block_influence(h, h) == pytest.approx(0.0, abs=1e-6)
    assert block_influence(h, -h) == pytest.approx(2.0, abs=1e-6)


def test_removal_that_leaves_nothing_is_refused():
    assert removal_count(12, 0.25, "heads") == 3
    with pytest.raises(UserError, match="zero heads"):
        removal_count(2, 0.9, "heads")


@pytest.mark.parametrize("kw,match", [(dict(target="rows"), "unknown structured target"),
                                      (dict(sparsity=1.0), r"outside \[0, 1\)")])
def test_bad_structured_settings(kw, match):
    with pytest.raises(UserError, match=match):
        StructuredConfig(**kw)


# --- whole models -----------------------------------------------------------------------------------


def _check_smaller_model(tmp_path, arch, zeroed, new):
    """Equal outputs to the zeroed original; saved, reloaded by from_pretrained with matching config."""
    from compress.models import auto_class

    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    expected = model_output(zeroed, ids)
    assert torch.allclose(model_output(new, ids), expected, atol=1e-5)
    new.save_pretrained(tmp_path / arch, safe_serialization=True)
    reloaded = auto_class(new.config).from_pretrained(tmp_path / arch)
    assert torch.allclose(model_output(reloaded.eval(), ids), expected, atol=1e-5)
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in zeroed.parameters())
    return reloaded


@pytest.mark.parametrize("arch", MLP_ARCHS)
def test_mlp_channels_removed(arch, tmp_path):
    from compress.prune.surgery import mlp_layout, mlp_width
    model = tiny(arch)
    before = mlp_width(model.config)
    new, stats = structured(model, target="mlp", sparsity=0.25)
    reloaded = _check_smaller_model(tmp_path, arch, model, new)
    assert mlp_width(reloaded.config) == before - before // 4
    layout = mlp_layout(reloaded)
    _, blocks = find_blocks(reloaded)
    for block in blocks:
        assert block.get_submodule(layout.output).in_features == mlp_width(reloaded.config)
    assert stats.structure["units_after"] == mlp_width(reloaded.config)
    assert len(stats.structure["removed_per_block"]) == len(blocks)


@pytest.mark.parametrize("arch", HEAD_ARCHS)
def test_kv_groups_removed(arch, tmp_path):
    model = tiny(arch)  # 4 heads sharing 2 kv heads: one group of 2 heads goes at 50%
    new, stats = structured(model, target="heads", sparsity=0.5)
    reloaded = _check_smaller_model(tmp_path, arch, model, new)
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == (2, 1)
    assert stats.structure["unit"] == "kv groups"


def test_heads_removed_without_grouped_query_attention(tmp_path):
    from compress.prune.surgery import resized_config, rebuild
    from compress.select import find_blocks as blocks_of
    model = tiny("llama")
    # The same tiny Llama with one kv head per head (plain multi-head attention).
    config = resized_config(model.config, heads=(4, 4))
    mha = rebuild(model, config, {k: v for k, v in _random_state(config).items()})
    new, stats = structured(mha, target="heads", sparsity=0.5)
    assert (new.config.num_attention_heads, new.config.num_key_value_heads) == (2, 2)
    assert stats.structure["unit"] == "heads"
    _check_smaller_model(tmp_path, "mha", mha, new)
    assert blocks_of(new)[1][0].self_attn.k_proj.out_features == 2 * 16
    # 3 heads would not divide the hidden size (64), which transformers refuses: said before any work.
    with pytest.raises(UserError, match="multiple of the head count; sparsities that work: 0.50, 0.75"):
        structured(mha, target="heads", sparsity=0.25)


def _random_state(config):
    from transformers import LlamaForCausalLM
    torch.manual_seed(3)
    return LlamaForCausalLM(config).state_dict()


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_layers_removed(arch, tmp_path):
    model = tiny(arch)
    layers = model.config.num_hidden_layers  # 2, and Gemma 3's 6
    new, stats = structured(model, target="layers", sparsity=0.5)
    assert new.config.num_hidden_layers == layers // 2
    assert len(find_blocks(new)[1]) == layers // 2
    kept = stats.structure["kept_layers"]
    assert len(kept) == layers // 2 and len(stats.structure["block_influence"]) == layers
    # The kept block is the original block, byte for byte.
    prefix, blocks = find_blocks(model)
    for (name, a), (_, b) in zip(blocks[kept[0]].state_dict().items(), find_blocks(new)[1][0].state_dict().items()):
        assert torch.equal(a, b), name
    from compress.models import auto_class
    new.save_pretrained(tmp_path / arch, safe_serialization=True)
    reloaded = auto_class(new.config).from_pretrained(tmp_path / arch).eval()
    ids = torch.randint(0, 512, (1, 12))
    assert torch.allclose(model_output(reloaded, ids), model_output(new, ids), atol=1e-5)


@pytest.mark.parametrize("arch,target,match", [
    ("bloom", "mlp", "no MLP width setting"),
    ("mpt", "mlp", "no MLP width setting"),
    ("opt", "heads", "derives the head size"),
    ("falcon", "heads", "derives the head size"),
    ("phi3", "heads", "derives the head size"),
    ("mixtral", "mlp", "mixtures of experts"),
    ("qwen2_moe", "mlp", "mixtures of experts"),
])
def test_architectures_a_target_cannot_handle_are_refused(arch, target, match):
    with pytest.raises(UserError, match=match):
        structured(tiny(arch), target=target)


def test_removing_every_kv_group_is_refused():
    with pytest.raises(UserError, match="zero kv groups"):
        structured(tiny("llama"), target="heads", sparsity=0.8)
