"""FP8 W8A8, dynamic (--method fp8): E4M3 weights per output channel as compressed-tensors writes them, activations
rounded to E4M3 per token, and a checkpoint that transformers (with the [ct] extra) runs exactly as our loader does."""

import json

import pytest
import torch

from compress.api import QuantizeRequest, quantize
from compress.checkpoint import load_quantized
from compress.errors import UserError
from compress.quant.config import Fp8Config
from compress.quant.layouts import LAYOUTS
from compress.quant.linear import QuantLinear
from compress.quant.primitives import FP8_MAX, fake_quantize_tokens_fp8, fp8_quantize


def weight(rows=64, cols=128, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_weights_are_e4m3_values_of_their_row_maximum_over_448():
    w = weight()
    qw = fp8_quantize(w)
    assert qw.float_codes and qw.scale.shape == (1, 64)
    assert torch.allclose(qw.scale[0], w.abs().amax(dim=1) / FP8_MAX)
    back = qw.dequantize()
    # E4M3 keeps 3 mantissa bits: within 1/16 of each value (plus the subnormal step near zero).
    assert ((back - w).abs() <= w.abs() / 16 + qw.scale.t() * 2 ** -9).all()
    assert torch.allclose(back.abs().amax(dim=1), w.abs().amax(dim=1), rtol=1e-6)  # each row's maximum is kept


def test_the_float_quantized_layout_is_what_compressed_tensors_quantizes():
    forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward", reason="install the [ct] extra")
    from compressed_tensors.quantization import QuantizationArgs

    qw = fp8_quantize(weight(seed=1))
    layout = LAYOUTS["float-quantized"]
    tensors = layout.pack(qw, True, -1)
    assert tensors["weight"].dtype == torch.float8_e4m3fn and tensors["weight_scale"].dtype == torch.float32
    back = layout.unpack(tensors, 8, 128, -1)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.dequantize(), qw.dequantize())
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    theirs = forward.quantize(x=weight(seed=1), scale=tensors["weight_scale"], zero_point=torch.zeros(64, 1),
                              args=args, dtype=torch.float8_e4m3fn)
    assert torch.equal(theirs.view(torch.uint8), tensors["weight"].view(torch.uint8))


def test_activations_are_rounded_to_e4m3_per_token():
    x = torch.randn(4, 9, 128) * torch.arange(1, 5)[:, None, None]
    q = fake_quantize_tokens_fp8(x)
    scale = x.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    values = q / scale  # E4M3 values, up to the float32 rounding of the division
    assert torch.allclose(values.to(torch.float8_e4m3fn).float(), values, rtol=1e-5)
    assert torch.allclose(values.abs().amax(dim=-1), torch.full(values.shape[:-1], FP8_MAX), rtol=1e-5)
    layer = QuantLinear.from_quantized(fp8_quantize(weight()), -1, None, "float-quantized", sym=True, act_bits=8)
    assert torch.allclose(layer(x), torch.nn.functional.linear(q, fp8_quantize(weight()).dequantize()))


def test_fp8_has_fixed_settings():
    with pytest.raises(UserError, match="--method fp8 has fixed settings"):
        Fp8Config(scale_search="mse")
    with pytest.raises(UserError, match="takes 8-bit symmetric weights"):
        Fp8Config(bits=4)


def test_the_checkpoint_runs_in_transformers_exactly_as_in_our_loader(tmp_path):
    pytest.importorskip("compressed_tensors", reason="install the [ct] extra")
    from transformers import AutoModelForCausalLM

    result = quantize(QuantizeRequest(model="tiny-llama", method="fp8", out=str(tmp_path / "q"), progress=False,
                                      device="cpu"))
    assert result.folder.name.endswith("fp8-dynamic") or result.folder.name == "q"
    qcfg = json.loads((result.folder / "config.json").read_text())["quantization_config"]
    group = qcfg["config_groups"]["group_0"]
    assert qcfg["format"] == "float-quantized" and group["weights"]["type"] == "float"
    assert group["input_activations"]["type"] == "float" and group["input_activations"]["dynamic"]
    assert result.manifest["calibration"] is None  # data-free
    ours, _ = load_quantized(result.folder)
    theirs = AutoModelForCausalLM.from_pretrained(result.folder, dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = theirs(ids).logits, ours(ids).logits
    # compressed-tensors rounds FP8 activations per token as we do (max / 448): the same logits.
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5


def test_weight_only_readers_name_fp8_activations_when_they_refuse(tmp_path, capsys):
    from compress.cli import main

    folder = quantize(QuantizeRequest(model="tiny-llama", method="fp8", out=str(tmp_path / "q"), progress=False,
                                      device="cpu")).folder
    assert main(["export-gguf", str(folder), "--type", "q8_0", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "activations quantized to FP8 per token" in err
