"""The command line's help states each method's defaults from its config dataclass."""

from dataclasses import dataclass
from typing import ClassVar

import pytest

from compress.help_text import defaults_by_method, method_choices


@dataclass
class A:
    level: int = 3
    mode: str = "x"


@dataclass
class B:
    DEFAULT_SHARE: ClassVar[float] = 0.25

    level: int = 3
    share: float | None = None


@dataclass
class C:
    level: int = 7


def test_defaults_are_grouped_by_value_in_table_order():
    table = {"a": A, "b": B, "c": C}
    assert defaults_by_method("level", table) == "3 for a and b, 7 for c"
    assert defaults_by_method("mode", table) == "x for a"
    assert defaults_by_method("share", table) == "0.25 for b"  # None: the config names its plain default
    assert method_choices(table, "b") == "a, b (default) or c"
    with pytest.raises(KeyError):
        defaults_by_method("nothing", table)


def test_the_quantize_and_prune_help_follow_the_configs(capsys, monkeypatch):
    from compress.cli import main
    from compress.prune.config import PRUNE_CONFIGS, PruneConfig
    from compress.quant.config import QUANT_CONFIGS, GPTQConfig

    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"GPTQ dampening, a fraction of the Hessian's mean diagonal (default: {GPTQConfig.damp_percent} for gptq)" \
        in text
    assert f"(default: {defaults_by_method('scale_search', QUANT_CONFIGS)})" in text
    monkeypatch.setattr(PruneConfig, "DEFAULT_SPARSITY", 0.6)  # a changed default shows up in the help
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.6 for magnitude, wanda and sparsegpt, 0.25 for structured; N:M implies its own)" in text
    assert f"(default: {defaults_by_method('comparison', PRUNE_CONFIGS)})" in text


def test_the_tables_are_the_registered_methods_configs():
    from compress.prune.config import PRUNE_CONFIGS
    from compress.quant.config import QUANT_CONFIGS
    from compress.registry import BUILTIN_PRUNE, BUILTIN_QUANT, get_method, get_prune_method

    assert list(QUANT_CONFIGS) == list(BUILTIN_QUANT) and list(PRUNE_CONFIGS) == list(BUILTIN_PRUNE)
    for name, cls in QUANT_CONFIGS.items():
        assert get_method(name).config_cls is cls
    for name, cls in PRUNE_CONFIGS.items():
        assert get_prune_method(name).config_cls is cls
