"""The default format, compressed-tensors pack-quantized: its tensors are bit for bit what the compressed-tensors
package packs, transformers (with that package) runs every checkpoint we write as our loader does, and the
format's choice and refusals are one line each."""

import json

import pytest
import torch

from compress.api import QuantizeRequest, quantize
from compress.checkpoint import load_quantized
from compress.cli import main
from compress.errors import UserError
from compress.formats import TRANSFORMERS_CANNOT, LayerWidth, choose_format
from compress.quant.config import GPTQConfig, RTNConfig
from compress.quant.layouts import LAYOUTS
from compress.quant.linear import QuantLinear
from compress.quant.primitives import default_g_idx
from compress.quant.rtn import rtn_quantize
from tests.conftest import CAUSAL_ARCHS

CT = LAYOUTS["compressed-tensors"]


def weight(rows=64, cols=128, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_the_layout_round_trips_and_is_what_compressed_tensors_packs(bits, sym):
    pack_quantized = pytest.importorskip("compressed_tensors.compressors", reason="install the [ct] extra")
    qw = rtn_quantize(weight(), RTNConfig(bits, 32, sym=sym))
    tensors = CT.pack(qw, sym, 32)
    back = CT.unpack(tensors, bits, 128, 32)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zero, qw.zero) and torch.equal(back.scale, qw.scale)
    assert torch.equal(back.g_idx, default_g_idx(128, 32))
    # compressed-tensors holds signed codes (q - 2**(bits-1)) and packs them with that offset added back.
    offset = 2 ** (bits - 1)
    assert torch.equal(tensors["weight_packed"],
                       pack_quantized.pack_to_int32((qw.codes - offset).to(torch.int8), bits))
    assert tensors["weight_scale"].shape == (64, 4) and tensors["weight_shape"].tolist() == [64, 128]
    if sym:
        assert "weight_zero_point" not in tensors
    else:
        signed_zero = (qw.zero.t() - offset).to(torch.int8)  # [out, groups]
        assert torch.equal(tensors["weight_zero_point"], pack_quantized.pack_to_int32(signed_zero, bits, packed_dim=0))


def test_rows_pack_like_the_whole_layer():
    """A head is packed a chunk of rows at a time: the same bytes as packing it whole."""
    qw = rtn_quantize(weight(96, 64), RTNConfig(4, 32, sym=False))
    whole = QuantLinear.from_quantized(qw, 32, None, "compressed-tensors")
    chunked = QuantLinear(64, 96, 4, 32, bias=False, checkpoint_format="compressed-tensors")
    for start in (0, 32, 64):
        chunked.set_rows(start, start + 32, rtn_quantize(weight(96, 64)[start:start + 32], RTNConfig(4, 32, sym=False)))
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), chunked.state_dict().values()))
    assert torch.equal(whole.dequantized_rows(32, 64), qw.dequantize()[32:64])


def test_a_group_order_cannot_be_written():
    qw = rtn_quantize(weight(), RTNConfig(4, 32))
    qw.g_idx = torch.randperm(128).to(torch.int32) // 32
    with pytest.raises(ValueError, match="contiguous columns"):
        CT.pack(qw, False, 32)


# --- read back by transformers ------------------------------------------------------------------------------

# transformers 5 fuses Mixtral's experts into 3-D tensors that compressed-tensors does not quantize, and Falcon's
# FalconLinear reads its own ``weight`` (which compressed-tensors removes): both stay with our loader and vLLM.
TRANSFORMERS_ARCHS = [a for a in CAUSAL_ARCHS if a not in TRANSFORMERS_CANNOT]


def quantized(arch, tmp_path, calib_file, **kw):
    settings = dict(model=f"tiny-{arch}", method="gptq", bits=4, group_size=32, calib=str(calib_file), nsamples=8,
                    seqlen=64, out=str(tmp_path / arch), progress=False, device="cpu")
    settings.update(kw)
    return quantize(QuantizeRequest(**settings))


def relative_gap(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("arch", TRANSFORMERS_ARCHS)
def test_transformers_runs_the_default_checkpoint_as_our_loader_does(arch, tmp_path, calib_file):
    pytest.importorskip("compressed_tensors", reason="install the [ct] extra")
    from transformers import AutoModelForCausalLM

    folder = quantized(arch, tmp_path, calib_file).folder
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    ours, _ = load_quantized(folder)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert not [m for m in theirs.modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        # transformers decompresses each layer to float32 with the same arithmetic: equal up to summation order.
        assert relative_gap(theirs(ids).logits, ours(ids).logits) < 1e-5


@pytest.mark.parametrize("kw", [dict(method="rtn", sym=True, bits=8, group_size=-1),
                                dict(method="gptq", avg_bits=6.0, group_size=32)])
def test_symmetric_per_channel_and_mixed_precision_checkpoints_load_in_transformers(kw, tmp_path, calib_file):
    pytest.importorskip("compressed_tensors", reason="install the [ct] extra")
    from transformers import AutoModelForCausalLM

    result = quantized("llama", tmp_path, calib_file, **kw)
    qcfg = json.loads((result.folder / "config.json").read_text())["quantization_config"]
    ours, _ = load_quantized(result.folder)
    if "avg_bits" in kw:
        chosen = {name: c["option"]["bits"] for name, c in result.manifest["mixed_precision"]["layers"].items()}
        assert len(set(chosen.values())) > 1 and len(qcfg["config_groups"]) > 1
        assert "vLLM" not in result.manifest["format"]["engines"]  # its CPU kernels run no 8-bit weight-only layer
        assert all(ours.get_submodule(name).bits == bits for name, bits in chosen.items())
        # vLLM fuses q/k/v and gate/up into one layer each, with one scheme: the choice gives them one option.
        assert result.manifest["mixed_precision"]["fused"] == [["gate_proj", "up_proj"], ["q_proj", "k_proj", "v_proj"]]
        layers = result.manifest["mixed_precision"]["layers"]
        for block in range(2):
            for siblings in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                             ("mlp.gate_proj", "mlp.up_proj")):
                assert len({json.dumps(layers[f"model.layers.{block}.{leaf}"]["option"]) for leaf in siblings}) == 1
    else:
        assert qcfg["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    theirs = AutoModelForCausalLM.from_pretrained(result.folder, dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_gap(theirs(ids).logits, ours(ids).logits) < 1e-5


@pytest.mark.parametrize("arch", ["falcon", "mixtral"])
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_the_closing_line_leaves_out_transformers_for_the_families_it_cannot_run(arch, fmt, tmp_path, calib_file):
    result = quantized(arch, tmp_path, calib_file, method="rtn", format=fmt)
    engines = result.manifest["format"]["engines"]
    assert not any(engine.startswith("transformers") for engine in engines)
    assert "compress bench (our loader)" in engines and ("GPTQModel" in engines) == (fmt == "gptq")


# --- which format, and one-line refusals ----------------------------------------------------------------------

WIDTHS = [LayerWidth("model.layers.0.self_attn.q_proj", 576), LayerWidth("model.layers.0.mlp.down_proj", 1536)]


def test_the_default_steps_its_group_size_down_until_it_divides_every_width():
    choice = choose_format(None, GPTQConfig(), WIDTHS, group_size_asked=False)
    assert (choice.format.name, choice.group_size, choice.note) == ("compressed-tensors", 64, None)


@pytest.mark.parametrize("cfg, asked_group, why", [
    (RTNConfig(bits=3), False, "holds 2, 4, 8-bit weights, not 3-bit ones"),
    (GPTQConfig(static_groups=False, group_aware=False), False, "act order needs whole groups"),
    (GPTQConfig(group_size=128), True, "--group-size 128 does not divide the 576 input features of "
                                        "model.layers.0.self_attn.q_proj, and vLLM needs groups that divide every "
                                        "width (choose 32, 48, 64, 96, 192 or -1)"),
])
def test_settings_only_gptq_holds_write_gptq_by_default_and_are_refused_for_compressed_tensors(cfg, asked_group, why):
    choice = choose_format(None, cfg, WIDTHS, group_size_asked=asked_group)
    assert choice.format.name == "gptq" and choice.group_size == cfg.group_size and why in choice.note
    with pytest.raises(UserError, match="--format compressed-tensors cannot hold these settings") as error:
        choose_format("compressed-tensors", cfg, WIDTHS, group_size_asked=asked_group)
    assert why in str(error.value) and str(error.value).endswith("or use --format gptq")


def test_cli_refusals_are_one_line(tmp_path, capsys, calib_file):
    out = tmp_path / "q"
    assert main(["quantize", "tiny-llama", "--bits", "3", "--format", "compressed-tensors", "--method", "rtn",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds 2, 4, 8-bit weights, not 3-bit ones" in err and not out.exists()
    assert main(["quantize", "tiny-llama", "--method", "bnb", "--format", "gptq", "--out", str(out)]) == 2
    assert "--format applies to gptq, awq and rtn" in capsys.readouterr().err


def test_gptq_format_with_a_group_order_reloads(tmp_path, calib_file):
    """--format gptq still holds what only it can: act order by groups (a g_idx), partial last groups."""
    result = quantized("llama", tmp_path, calib_file, format="gptq", static_groups=False, group_aware=False)
    qcfg = json.loads((result.folder / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["desc_act"] is True
    assert "vLLM" not in result.manifest["format"]["engines"] and "GPTQModel" in result.manifest["format"]["engines"]
    ours, _ = load_quantized(result.folder)
    layer = ours.get_submodule("model.layers.0.self_attn.q_proj")
    assert not torch.equal(layer.g_idx, default_g_idx(layer.in_features, 32))
