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


def test_builtin_name_tables_match_the_registered_classes():
    # The command line checks method names from these tables without importing the methods: they must not drift.
    assert set(registry.BUILTIN_QUANT) == set(registry.available_methods())
    assert set(registry.BUILTIN_PRUNE) == set(registry.available_prune_methods())
    for table, methods in ((registry.BUILTIN_QUANT, registry.METHODS), (registry.BUILTIN_PRUNE, registry.PRUNE_METHODS)):
        for name, module in table.items():
            assert type(methods[name]).__module__ == module


def test_name_checks_give_the_lookups_errors(monkeypatch):
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    for check, lookup in ((registry.check_method_name, registry.get_method),
                          (registry.check_prune_method_name, registry.get_prune_method)):
        with pytest.raises(UserError) as quick:
            check("nope")
        with pytest.raises(UserError) as full:
            lookup("nope")
        assert str(quick.value) == str(full.value)
    registry.check_method_name("gptq")
    registry.check_prune_method_name("wanda")


def test_a_plugin_name_is_checked_by_the_full_lookup(monkeypatch):
    class FakeEntryPoint:
        name = "elsewhere"

    monkeypatch.setattr(registry, "_plugin_names", lambda: {"elsewhere"})
    monkeypatch.setattr(registry, "get_method", lambda name: (_ for _ in ()).throw(UserError(f"looked up {name}")))
    with pytest.raises(UserError, match="looked up nope"):
        registry.check_method_name("nope")
