import sys
import types

import pytest
import torch

from compress import registry
from compress.errors import UserError
from compress.quant.config import WeightQuantConfig
from compress.quant.rtn import rtn_quantize


def test_builtin_methods():
    methods = registry.available_methods()
    assert {"rtn", "gptq"} <= set(methods)
    assert methods["gptq"].needs_calibration and not methods["rtn"].needs_calibration


def test_unknown_method_lists_choices():
    with pytest.raises(UserError, match="unknown method 'nope'.*gptq.*rtn"):
        registry.get_method("nope")


def test_entry_point_plugin_is_registered(monkeypatch):
    class HalfRTN(registry.QuantMethod):
        name = "half-rtn"
        config_cls = WeightQuantConfig
        needs_calibration = False

        def quantize_weight(self, weight, hessian, cfg):
            return rtn_quantize(weight / 2, cfg)

    module = types.ModuleType("third_party_plugin")
    module.HalfRTN = HalfRTN
    monkeypatch.setitem(sys.modules, "third_party_plugin", module)

    class FakeEntryPoint:
        name = "half-rtn"

        def load(self):
            return HalfRTN

    monkeypatch.setattr(registry, "entry_points", lambda group: [FakeEntryPoint()] if group == "compress.methods" else [])
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    method = registry.get_method("half-rtn")
    qw = method.quantize_weight(torch.ones(32, 32), None, WeightQuantConfig(bits=8, group_size=-1))
    assert torch.allclose(qw.dequantize(), torch.full((32, 32), 0.5), atol=1e-2)


def test_builtin_prune_methods():
    methods = registry.available_prune_methods()
    assert {"magnitude", "wanda", "sparsegpt", "structured"} <= set(methods)
    assert not methods["magnitude"].needs_calibration and methods["wanda"].needs_calibration
    with pytest.raises(UserError, match="unknown pruning method 'nope'"):
        registry.get_prune_method("nope")
