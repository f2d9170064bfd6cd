"""A saved W4/W8 checkpoint run by the torch backend gives the logits of the model that was saved,
to bfloat16 precision, on every seed decoder architecture."""

from __future__ import annotations

import pytest
import torch

from compress.api import QuantizeRequest, quantize
from compress.bench.load import load_for_bench
from tests.conftest import CAUSAL_ARCHS


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_fused_kernels_agree_with_the_saved_model(arch, tmp_path):
    result = quantize(QuantizeRequest(model=f"tiny-{arch}", method="rtn", bits=4, group_size=32, lm_head_bits=8,
                                      out=str(tmp_path / "q"), device="cpu", progress=False, in_memory=True))
    loaded = load_for_bench(str(result.folder), "auto", torch.device("cpu"))
    assert loaded.backend == "torch" and "dequantizing" not in loaded.kernel, loaded.kernel
    reference_bf16 = load_for_bench(str(result.folder), "bfloat16", torch.device("cpu"), backend="dequant").model
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        expected = result.model.eval()(ids).logits
        dense_bf16 = reference_bf16(ids).logits.float()
        got = loaded.model(ids).logits.float()
    # The same weights in bfloat16 through F.linear set the scale of rounding the kernels may add.
    bf16_error = (dense_bf16 - expected).abs().max()
    assert (got - expected).abs().max() <= 4 * bf16_error + 1e-3


def test_conversion_frees_each_replaced_layer_before_the_next(monkeypatch, tmp_path):
    """Only the layer being converted and those not reached yet are alive: the model never holds two
    copies of its weights (the peak would double: 7B W4 needed 7.7 GiB instead of 4.5)."""
    import weakref

    from compress.backends import torch_backend
    from compress.checkpoint import load_quantized
    from compress.quant.linear import QuantLinear

    result = quantize(QuantizeRequest(model="tiny-llama", method="rtn", bits=4, group_size=32,
                                      out=str(tmp_path / "q"), device="cpu", progress=False))
    model, _ = load_quantized(result.folder, torch.bfloat16)
    layers = [weakref.ref(m) for m in model.modules() if isinstance(m, QuantLinear)]
    alive = []
    real = torch_backend.fast_layer

    def counting(layer, dtype, needs_rows):
        alive.append(sum(ref() is not None for ref in layers))
        return real(layer, dtype, needs_rows)

    monkeypatch.setattr(torch_backend, "fast_layer", counting)
    used, kept = torch_backend.convert(model, torch.bfloat16)
    assert not kept and sum(used.values()) == len(layers) > 2
    assert alive == [len(layers) - i for i in range(len(layers))]


def test_llamacpp_peer_without_the_package_names_the_extra(monkeypatch, tmp_path):
    import builtins

    from compress.errors import UserError
    from compress.peers.llamacpp import decode_speed

    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    with pytest.raises(UserError, match=r"pip install 'compress-workbench\[llamacpp\]'"):
        decode_speed(tmp_path / "model.gguf", [1, 2, 3], 2, 1)
