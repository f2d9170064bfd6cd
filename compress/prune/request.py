"""What `compress prune` is asked for: the shared run settings plus the pruning methods' options. Free of
torch, so the command line builds and checks a request before any heavy import."""

from __future__ import annotations

from dataclasses import dataclass

from compress.quant.config import WeightQuantConfig
from compress.registry import config_fields, get_prune_method
from compress.settings import RunSettings, method_option_values


PRUNE_OPTIONS = ("sparsity", "pattern", "comparison", "target", "damp_percent")
"""Request settings that belong to some pruning methods' configs (None: not given)."""


def prune_methods_taking(option: str) -> str:
    from compress.registry import available_prune_methods

    takers = [m.name for m in available_prune_methods().values() if option in config_fields(m)]
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
    """SparseGPT (and the GPTQ step of --bits): Hessian dampening, as a fraction of its mean diagonal (its
    config's default, 0.01)."""
    bits: int | None = None
    """Also quantize the kept weights to this many bits in the same run (SparseGPT: jointly, as in the
    paper; magnitude / Wanda: GPTQ that keeps the mask). Writes a GPTQ-format checkpoint."""
    group_size: int = 128
    sym: bool = True

    def method_config(self):
        """(method, its config) from the request; a setting the method has no use for is an error."""
        method = get_prune_method(self.method)
        return method, method.config_cls(**method_option_values(self, PRUNE_OPTIONS, method, prune_methods_taking))

    def quant_config(self) -> WeightQuantConfig | None:
        return WeightQuantConfig(self.bits, self.group_size, self.sym) if self.bits is not None else None
