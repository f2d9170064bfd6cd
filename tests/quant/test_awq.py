"""AWQ: folding its scales leaves every architecture's function unchanged, the search never loses to
plain quantization on what it measures, and the method writes a checkpoint our loader and others read."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.blocks import BlockSource
from compress.block_inputs import capture_block_inputs, linear_call_groups
from compress.quant.awq import awq_prepare_block, candidate_scales, fold, producer_candidates, weight_mean
from compress.select import ModuleSelection, block_linears
from compress.tiny import tiny_config
from tests.conftest import CAUSAL_ARCHS, calibration_ids


def tiny_model(arch: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).float().eval()
    # Random init gives every channel the same scale; AWQ is about channels that differ.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name.lower() or name.endswith("ln_1.weight") or "layernorm" in name.lower():
                p.mul_(torch.rand_like(p) * 3 + 0.2)
    return model


def fold_every_block(model, windows, bits=4, group_size=32):
    source = BlockSource.in_memory(model)
    inputs = capture_block_inputs(model, source.blocks, windows)
    records = []
    for i, block in enumerate(source.blocks):
        linears = block_linears(block, ModuleSelection())
        groups = linear_call_groups(block, linears, inputs)
        records += awq_prepare_block(f"{source.prefix}.{i}", block, linears, groups, inputs, bits, group_size, False)
        inputs.hidden = [inputs.call(block, j) for j in range(len(windows))]
    return records


@pytest.mark.parametrize("arch", [a for a in CAUSAL_ARCHS if a != "mixtral"] + ["mixtral"])
def test_folded_model_computes_the_same_function(arch):
    model = tiny_model(arch)
    windows = calibration_ids(4, 32)
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
    records = fold_every_block(model, windows)
    with torch.no_grad():
        after = model(ids).logits
    gap = float((after - before).abs().max() / before.abs().max())
    assert gap < 1e-4, f"{arch}: folding changed the logits by {gap:.2e}"
    if arch == "falcon":
        # Parallel attention: one norm feeds query_key_value and the MLP, which are separate groups (not
        # called one after the other), and the GELU MLP's down projection has no producer to fold into.
        assert all(r.producer is None for r in records)
        return
    assert any(r.producer is not None for r in records), f"{arch}: no group found a producer to fold into"
    assert any(r.ratio is not None for r in records), f"{arch}: no group was scaled"
    for r in records:  # never worse than plain quantization on the search's own measure
        if r.ratio is not None:
            assert r.loss_scaled < r.loss_plain
        elif r.producer is not None:
            assert r.loss_scaled == r.loss_plain


def test_producers_are_the_norms_and_the_linears_before_o_and_down():
    config = tiny_config("llama")
    config.num_key_value_heads = config.num_attention_heads  # no GQA: v_proj feeds o_proj channel for channel
    model = AutoModelForCausalLM.from_config(config).float().eval()
    records = fold_every_block(model, calibration_ids(4, 32))
    found = {tuple(n.rsplit(".", 1)[-1] for n in r.layers): r.producer.rsplit(".", 1)[-1] if r.producer else None
             for r in records[:4]}
    assert found == {("q_proj", "k_proj", "v_proj"): "input_layernorm", ("o_proj",): "v_proj",
                     ("gate_proj", "up_proj"): "post_attention_layernorm", ("down_proj",): "up_proj"}


def test_gqa_o_proj_and_experts_are_left_unscaled():
    model = tiny_model("llama")  # 4 heads, 2 key/value heads: v_proj is narrower than o_proj's input
    records = fold_every_block(model, calibration_ids(4, 32))
    o_proj = [r for r in records if r.layers[0].endswith("o_proj")]
    assert o_proj and all(r.producer is None for r in o_proj)
    block = model.model.layers[0]
    assert "self_attn.v_proj" not in producer_candidates(block, {"self_attn.o_proj": block.self_attn.o_proj})


def test_scales_math():
    x_mean = torch.tensor([1.0, 10.0, 0.1, 2.0])
    w_mean = torch.tensor([0.5, 0.5, 0.5, 0.5])
    s = candidate_scales(x_mean, w_mean, 0.5)
    assert torch.isclose(s.max() * s.min(), torch.tensor(1.0))
    assert s.argmax() == 1 and s.argmin() == 2  # larger activations, larger scales
    w = torch.tensor([[1.0, -2.0, 4.0, 0.5], [2.0, 2.0, -1.0, 1.0]])
    assert torch.allclose(weight_mean([w], 2), torch.tensor([0.75, 1.0, 1.0, 0.5625]))
    norm, layer = torch.nn.LayerNorm(4), torch.nn.Linear(4, 3)
    norm.bias.data.normal_()
    x = torch.randn(5, 4)
    expected = layer(norm(x))
    fold(norm, [layer], s)
    assert torch.allclose(layer(norm(x)), expected, atol=1e-5)


def test_awq_and_gptq_after_awq_write_checkpoints_that_reload_and_lower_the_error(tmp_path, calib_file):
    """On a model whose channels differ in scale, AWQ's folded scales lower the quantized model's error
    against the float model below plain RTN's, and the checkpoints reload with the same outputs."""
    from compress.api import QuantizeRequest, quantize
    from compress.checkpoint import load_quantized

    model = tiny_model("llama")
    source = tmp_path / "src"
    model.save_pretrained(source)
    from compress.tiny import tiny_tokenizer
    tiny_tokenizer().save_pretrained(source)
    common = dict(model=str(source), bits=3, group_size=32, sym=False, calib=str(calib_file), nsamples=8,
                  seqlen=64, progress=False, device="cpu")
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model(ids).logits

    def error(folder):
        reloaded, _ = load_quantized(folder)
        with torch.no_grad():
            return float((reloaded(ids).logits - reference).square().mean())

    rtn = quantize(QuantizeRequest(method="rtn", out=str(tmp_path / "rtn"), **common))
    awq = quantize(QuantizeRequest(method="awq", out=str(tmp_path / "awq"), **common))
    both = quantize(QuantizeRequest(method="gptq", awq=True, out=str(tmp_path / "both"), **common))
    scaled = [s for s in awq.manifest["awq_scales"] if s["ratio"] is not None]
    assert scaled and all(s["producer"] for s in scaled)
    assert both.manifest["awq_scales"] and both.manifest["config"]["awq"] is True
    assert error(awq.folder) < error(rtn.folder)
    assert error(both.folder) < error(rtn.folder)


@pytest.mark.parametrize("arch, expected", [
    # Gemma's norms scale by 1 + weight: the scales fold as (1 + w) / s - 1, into every norm before a group.
    *[(arch, {("q_proj", "k_proj", "v_proj"): ("input_layernorm", "1 + weight"),
              ("gate_proj", "up_proj"): ("pre_feedforward_layernorm", "1 + weight"),
              ("down_proj",): ("up_proj", None)}) for arch in ("gemma2", "gemma3")],
    # Phi-3's down_proj reads act(gate) * up, up being the second half of the fused gate_up_proj's rows.
    ("phi3", {("qkv_proj",): ("input_layernorm", None), ("gate_up_proj",): ("post_attention_layernorm", None),
              ("down_proj",): ("gate_up_proj", "rows 128:256")}),
    ("qwen2", {("q_proj", "k_proj", "v_proj"): ("input_layernorm", None),
               ("gate_proj", "up_proj"): ("post_attention_layernorm", None), ("down_proj",): ("up_proj", None)}),
])
def test_todays_families_fold_into_every_producer_they_have(arch, expected):
    """The folded model computes the same function (test above); here: each group with a producer found it, with the
    fold its producer needs, and each group left alone says why (o_proj under grouped-query attention)."""
    model = tiny_model(arch)
    records = fold_every_block(model, calibration_ids(4, 32))
    per_block = len(records) // model.config.num_hidden_layers
    for record in records[:per_block]:
        leaves = tuple(name.rsplit(".", 1)[-1] for name in record.layers)
        if leaves in expected:
            assert (record.producer.rsplit(".", 1)[-1], record.fold) == expected[leaves], leaves
        else:
            assert leaves in (("o_proj",),) and record.producer is None
            assert "no module of the block produces its input" in record.unscaled_because
    assert all(r.unscaled_because for r in records if r.ratio is None)
