"""What `compress prune` is asked for: the shared run settings plus the pruning methods' options. Free of
torch, so the command line builds and checks a request before any heavy import."""

from __future__ import annotations

from dataclasses import dataclass

from compress.prune.config import KeptWeightsQuantConfig
from compress.registry import config_fields, get_prune_method
from compress.settings import RunSettings, method_option_values


PRUNE_OPTIONS = ("sparsity", "pattern", "comparison", "target", "damp_percent")
"""Request settings that belong to some pruning methods' configs (None: not given)."""


def prune_methods_taking(option: str) -> str:
    from compress.registry import available_prune_methods

    takers = [m.name for m in available_prune_methods().values() if option in config_fields(m)]
    if option == "damp_percent":  # also the GPTQ step's, when the kept weights are quantized
        return f"leave it out, prune with {' or '.join(takers)}, or add --bits (it then damps the GPTQ step)"
    return f"leave it out, or prune with {' or '.join(takers)}"


@dataclass
class PruneRequest(RunSettings):
    method: str = "wanda"
    """magnitude, wanda, sparsegpt or structured (or a plugin's name)."""
    sparsity: float | None = None
    """Fraction removed, in [0, 1): of each layer's weights (default 0.5; N:M implies it), or for
    structured of the MLP channels / heads / layers (default 0.25)."""
    pattern: str | None = None
    """Weight methods: unstructured (their default), or N:M such as 2:4 or 4:8."""
    comparison: str | None = None
    """Magnitude / Wanda, unstructured: compare scores per output row or across the layer (method default)."""
    target: str | None = None
    """Structured: mlp (its default), heads or layers."""
    damp_percent: float | None = None
    """SparseGPT, or with --bits the GPTQ step that quantizes magnitude's or Wanda's kept weights: Hessian
    dampening, as a fraction of its mean diagonal (None: the config's default)."""
    bits: int | None = None
    """Also quantize the kept weights to this many bits in the same run (SparseGPT: jointly, as in the
    paper; magnitude / Wanda: GPTQ that keeps the mask). Writes a GPTQ-format checkpoint."""
    group_size: int = 128
    sym: bool = True

    def method_config(self):
        """(method, its config) from the request; a setting the method has no use for is an error."""
        method = get_prune_method(self.method)
        options = PRUNE_OPTIONS if not self._damp_for_quant_step(method) else \
            tuple(o for o in PRUNE_OPTIONS if o != "damp_percent")
        return method, method.config_cls(**method_option_values(self, options, method, prune_methods_taking))

    def quant_config(self) -> KeptWeightsQuantConfig | None:
        if self.bits is None:
            return None
        damp = {"damp_percent": self.damp_percent} if self._damp_for_quant_step(get_prune_method(self.method)) else {}
        return KeptWeightsQuantConfig(bits=self.bits, group_size=self.group_size, sym=self.sym, **damp)

    def _damp_for_quant_step(self, method) -> bool:
        """--damp-percent given with --bits to a method whose own config has no dampening (magnitude, Wanda): it
        is the GPTQ step's, which quantizes the kept weights."""
        return self.damp_percent is not None and self.bits is not None and "damp_percent" not in config_fields(method)
