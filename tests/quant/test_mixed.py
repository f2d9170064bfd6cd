"""Mixed precision: the budget selection meets its target and spends it where the loss is, and the
checkpoint it writes holds each layer's own bits for our loader and GPTQModel."""

import json

import pytest
import torch

from compress.api import QuantizeRequest, quantize
from compress.checkpoint import load_quantized
from compress.errors import UserError
from compress.quant.mixed import (LayerCost, LayerOption, average_bits, choose_options, fuse, fused_units, stored_bits,
                                  unfuse)

W3, W4, W8 = LayerOption(3, 128), LayerOption(4, 128), LayerOption(8, 128)


def costs():
    g = torch.Generator().manual_seed(0)
    layers = []
    for i in range(12):
        base = float(torch.rand(1, generator=g)) * (20 if i == 3 else 1)  # one layer far more sensitive
        layers.append(LayerCost(f"l{i}", (1024, 512), {W3: base * 4, W4: base, W8: base / 100}))
    return layers


def test_stored_bits_count_every_tensor_of_the_packed_layer():
    # 576 inputs at group 128: 5 groups; codes + zeros at 4 bits, fp16 scales, int32 g_idx.
    assert stored_bits(1536, 576, W4) == 576 * 1536 * 4 + 5 * 1536 * 4 + 5 * 1536 * 16 + 576 * 32


@pytest.mark.parametrize("target", [3.3, 4.25, 5.0, 8.3])
def test_the_choice_meets_its_budget_and_beats_uniform(target):
    layers = costs()
    choice = choose_options(layers, target)
    assert average_bits(layers, choice) <= target
    loss = sum(c.losses[choice[c.name]] for c in layers)
    for uniform in (W3, W4, W8):
        if average_bits(layers, {c.name: uniform for c in layers}) <= target:
            assert loss <= sum(c.losses[uniform] for c in layers)
    assert choice["l3"] != W3  # the most sensitive layer is the last to lose bits
    if target == 5.0:  # enough above uniform W4 (4.19 here) to give it 8 bits
        assert choice["l3"] == W8


def test_a_budget_below_the_smallest_option_is_refused():
    with pytest.raises(UserError, match="--avg-bits 2.5 is below"):
        choose_options(costs(), 2.5)


def test_mixed_precision_checkpoint_loads_with_each_layers_bits(tmp_path, calib_file):
    result = quantize(QuantizeRequest(model="tiny-llama", method="gptq", bits=4, group_size=32, avg_bits=4.9,
                                      calib=str(calib_file), nsamples=4, seqlen=32, out=str(tmp_path / "m"),
                                      device="cpu", progress=False, format="gptq"))
    mixed = result.manifest["mixed_precision"]
    assert mixed["avg_bits"] <= 4.9
    chosen = {name: c["option"]["bits"] for name, c in mixed["layers"].items()}
    assert len(set(chosen.values())) > 1, chosen
    qcfg = json.loads((result.folder / "config.json").read_text())["quantization_config"]
    assert len(qcfg["dynamic"]) == sum(1 for b in chosen.values() if b != 4)
    model, _ = load_quantized(result.folder)
    for name, bits in chosen.items():
        assert model.get_submodule(name).bits == bits


def test_a_budget_the_base_fits_only_buys_upgrades():
    layers = costs()
    uniform = average_bits(layers, {c.name: W4 for c in layers})
    choice = choose_options(layers, uniform + 0.4, base=W4)  # one of 12 layers to 8 bits costs 0.33
    assert W3 not in choice.values() and W8 in choice.values()
    assert average_bits(layers, choice) <= uniform + 0.4
    # Below the base's cost some layers must go down.
    assert W3 in choose_options(layers, uniform - 0.3, base=W4).values()


def test_the_sensitivity_pass_carries_only_its_windows_under_the_activation_budget(tmp_path, calib_file, monkeypatch):
    """--avg-bits measures 8 windows: only those are carried, and with a budget of 0 they go to files in the
    output's partial folder (removed after the pass), as every other pass's activations do."""
    from compress.activations import Activations
    from compress.cli import main
    from compress.quant import sensitivity

    carried, spilled = [], []
    real_replacing, real_spill = Activations.replacing, Activations._spill

    def replacing(self):
        carried.append(len(self))
        return real_replacing(self)

    def spill(self):
        spilled.append(self.spill_folder)
        return real_spill(self)

    monkeypatch.setattr(Activations, "replacing", replacing)
    monkeypatch.setattr(Activations, "_spill", spill)
    measured = []
    real_measure = sensitivity.measure_sensitivities

    def measure(*args, **kwargs):
        carried.clear()
        spilled.clear()
        result = real_measure(*args, **kwargs)
        measured.append((list(carried), list(spilled)))
        return result

    import compress.quant.run as api

    monkeypatch.setattr(api, "measure_sensitivities", measure)
    out = tmp_path / "q"
    assert main(["quantize", "tiny-llama", "--method", "rtn", "--avg-bits", "4.5", "--calib", str(calib_file),
                 "--nsamples", "16", "--seqlen", "32", "--activation-budget", "0", "--out", str(out),
                 "--device", "cpu", "--no-progress", "--format", "gptq"]) == 0
    (windows, folders), = measured
    assert windows and set(windows) == {sensitivity.SENSITIVITY_WINDOWS}  # not the 16 calibration windows
    assert folders and all(f == tmp_path / ".q.partial" / "activations" / "sensitivity" for f in folders)
    assert out.is_dir() and not (tmp_path / ".q.partial").exists()


def test_the_layers_vllm_fuses_are_grouped_under_one_parent_only_when_all_are_present():
    names = ["m.0.self_attn.q_proj", "m.0.self_attn.k_proj", "m.0.self_attn.v_proj", "m.0.self_attn.o_proj",
             "m.0.mlp.gate_proj", "m.0.mlp.up_proj", "m.0.mlp.down_proj", "m.1.mlp.gate_proj",
             "m.2.attention.query_key_value"]
    assert fused_units(names) == [names[:3], [names[3]], names[4:6], [names[6]], [names[7]], [names[8]]]


def test_fused_siblings_get_one_option_and_the_budget_counts_each_member():
    """q/k/v of one block fused: whatever the budget, the three share an option, the stored bits are the members'
    (three g_idx, not one), and a unit is upgraded for the sum of its members' losses."""
    g = torch.Generator().manual_seed(1)
    layers = []
    for block in range(4):
        for leaf, shape in (("q_proj", (512, 512)), ("k_proj", (128, 512)), ("v_proj", (128, 512)),
                            ("o_proj", (512, 512))):
            base = float(torch.rand(1, generator=g)) * (30 if (block, leaf) == (2, "k_proj") else 1)
            layers.append(LayerCost(f"b{block}.{leaf}", shape, {W4: base, W8: base / 100}))
    units = fused_units([c.name for c in layers])
    fused = fuse(layers, units)
    assert len(fused) == 8 and fused[0].name == "b0.q_proj+b0.k_proj+b0.v_proj"
    assert fused[0].bits(W4) == sum(c.bits(W4) for c in layers[:3]) and fused[0].weight_count == 768 * 512
    uniform = average_bits(layers, {c.name: W4 for c in layers})
    for extra in (0.3, 1.0, 2.0):
        choice = unfuse(choose_options(fused, uniform + extra, base=W4))
        assert set(choice) == {c.name for c in layers} and average_bits(layers, choice) <= uniform + extra
        for block in range(4):
            assert len({choice[f"b{block}.{leaf}"] for leaf in ("q_proj", "k_proj", "v_proj")}) == 1
    # The sensitive k_proj takes its siblings up with it first.
    assert choice["b2.q_proj"] == choice["b2.v_proj"] == W8
