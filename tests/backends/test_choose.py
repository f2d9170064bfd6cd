"""Which backend runs a checkpoint: auto takes the fastest that can and says what it passed over; a
backend named by the user runs or fails with a one-line reason, never a silent switch."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from compress.backends import choose_backend
from compress.bench.load import load_for_bench
from compress.errors import UserError

CPU = torch.device("cpu")


def gptq(bits=4, group_size=128, **extra):
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, **extra}


def test_auto_takes_the_fused_kernels_for_4_and_per_channel_8_bits():
    assert choose_backend("auto", gptq(4), CPU)[0].name == "torch"
    assert choose_backend("auto", gptq(8, -1), CPU)[0].name == "torch"
    assert choose_backend("auto", None, CPU)[0].name == "dense"


@pytest.mark.parametrize("qcfg, dtype, reason", [(gptq(3), None, "3-bit"), (gptq(8, 128), None, "group-size -1"),
                                                 (gptq(4), torch.float32, "bfloat16")])
def test_auto_falls_back_to_the_reference_and_says_why(qcfg, dtype, reason):
    backend, passed_over = choose_backend("auto", qcfg, CPU, dtype)
    assert backend.name == "dequant"
    assert len(passed_over) == 1 and passed_over[0].startswith("torch:") and reason in passed_over[0]


def test_a_head_at_8_bits_keeps_a_3_bit_body_on_the_fast_path_for_the_head():
    qcfg = gptq(3, dynamic={"+:^lm_head$": {"bits": 8, "group_size": -1}})
    assert choose_backend("auto", qcfg, CPU)[0].name == "torch"


@pytest.mark.parametrize("name, qcfg, message", [
    ("torch", gptq(3), "cannot run this checkpoint: no fused torch kernel for 3-bit"),
    ("bitsandbytes", gptq(4), "runs bitsandbytes models, not a gptq one"),
    ("dequant", None, "runs gptq, compressed-tensors models, not a dense one"),
    ("onnx-magic", gptq(4), "unknown backend 'onnx-magic'"),
])
def test_a_named_backend_that_cannot_run_it_is_an_error(name, qcfg, message):
    with pytest.raises(UserError, match=message):
        choose_backend(name, qcfg, CPU)


def test_the_torch_backend_is_cpu_only():
    with pytest.raises(UserError, match="does not run on cuda"):
        choose_backend("torch", gptq(4), torch.device("cuda"))


def test_a_backend_that_is_not_installed_names_its_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UserError, match=r"needs bitsandbytes: pip install 'compress-workbench\[bnb\]'"):
        choose_backend("bitsandbytes", {"quant_method": "bitsandbytes", "load_in_4bit": True}, CPU)


def test_an_unknown_quantization_format_is_refused():
    with pytest.raises(UserError, match="'awq' have no backend"):
        choose_backend("auto", {"quant_method": "awq"}, CPU)


def test_a_pinned_float32_run_of_a_w4_checkpoint_is_noted(tmp_path, calib_file):
    from compress.api import QuantizeRequest, quantize

    quantize(QuantizeRequest(model="tiny-llama", method="rtn", bits=4, group_size=32, out=str(tmp_path / "q"),
                             device="cpu", progress=False))
    loaded = load_for_bench(str(tmp_path / "q"), "float32", CPU)
    assert loaded.backend == "dequant" and "QuantLinear" in loaded.kernel
    assert any("passed over torch" in note for note in loaded.notes)
    fast = load_for_bench(str(tmp_path / "q"), "auto", CPU)
    assert fast.backend == "torch" and fast.dtype == torch.bfloat16 and not fast.notes
