"""bitsandbytes as a method: the saved checkpoint carries the standard quantization_config, reloads
through the bitsandbytes backend and gives the logits of the model it was saved from."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from compress.api import QuantizeRequest, quantize
from compress.bench.load import load_for_bench
from compress.errors import UserError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                reason="bitsandbytes is not installed (extra: bnb)")


@pytest.mark.parametrize("bits, layer", [(8, "Linear8bitLt"), (4, "Linear4bit")])
def test_a_bnb_checkpoint_reloads_with_the_same_logits(bits, layer, tmp_path):
    result = quantize(QuantizeRequest(model="tiny-llama", method="bnb", bits=bits, out=str(tmp_path / "b"),
                                      device="cpu", progress=False))
    qcfg = json.loads((result.folder / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "bitsandbytes"
    assert qcfg["load_in_8bit" if bits == 8 else "load_in_4bit"] is True
    if bits == 4:
        assert qcfg["bnb_4bit_use_double_quant"] is True and qcfg["bnb_4bit_quant_type"] == "nf4"
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        expected = result.model(ids).logits.float()
        loaded = load_for_bench(str(result.folder), "auto", torch.device("cpu"))
        got = loaded.model(ids).logits.float()
    assert loaded.backend == "bitsandbytes" and layer in loaded.kernel
    assert loaded.quantization["bits"] == bits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3 * expected.abs().max().item())


def test_bnb_refuses_other_bits_and_a_head_setting(tmp_path):
    with pytest.raises(UserError, match="8 or 4 bits, not 3"):
        quantize(QuantizeRequest(model="tiny-llama", method="bnb", bits=3, out=str(tmp_path / "x"), progress=False))
    with pytest.raises(UserError, match="--lm-head-bits applies to gptq, awq and rtn"):
        quantize(QuantizeRequest(model="tiny-llama", method="bnb", bits=4, lm_head_bits=8, out=str(tmp_path / "y"),
                                 progress=False))


def test_bnb_without_bitsandbytes_names_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'compress-workbench\[bnb\]'"):
        quantize(QuantizeRequest(model="tiny-llama", method="bnb", bits=4, out=str(tmp_path / "z"), progress=False))
