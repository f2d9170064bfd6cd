"""What `compress prune` is asked for: the shared run settings plus the pruning methods' options. Free of
torch, so the command line builds and checks a request before any heavy import."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from compress.errors import UserError
from compress.quant.config import WeightQuantConfig
from compress.registry import get_prune_method
from compress.settings import RunSettings


@dataclass
class PruneRequest(RunSettings):
    method: str = "wanda"
    """magnitude, wanda, sparsegpt or structured (or a plugin's name)."""
    sparsity: float | None = None
    """Fraction removed, in [0, 1): of each layer's weights (default 0.5; N:M implies it), or for
    structured of the MLP channels / heads / layers (default 0.25)."""
    pattern: str = "unstructured"
    """Weight methods: unstructured, or N:M such as 2:4 or 4:8."""
    comparison: str | None = None
    """Magnitude / Wanda, unstructured: compare scores per output row or across the layer (method default)."""
    target: str = "mlp"
    """Structured: mlp, heads or layers."""
    damp_percent: float = 0.01
    """SparseGPT (and the GPTQ step of --bits): Hessian dampening, as a fraction of its mean diagonal."""
    bits: int | None = None
    """Also quantize the kept weights to this many bits in the same run (SparseGPT: jointly, as in the
    paper; magnitude / Wanda: GPTQ that keeps the mask). Writes a GPTQ-format checkpoint."""
    group_size: int = 128
    sym: bool = True

    def method_config(self):
        """(method, its config) from the request; a setting the method has no use for is an error."""
        method = get_prune_method(self.method)
        names = {f.name for f in dataclasses.fields(method.config_cls)}
        defaults = PruneRequest()
        values = {}
        for name in ("sparsity", "pattern", "comparison", "target", "damp_percent"):
            value = getattr(self, name)
            if name in names:
                if value is not None:
                    values[name] = value
            elif value != getattr(defaults, name):
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} does not apply to {method.name} pruning: leave it out or choose a method "
                                "that uses it")
        return method, method.config_cls(**values)

    def quant_config(self) -> WeightQuantConfig | None:
        return WeightQuantConfig(self.bits, self.group_size, self.sym) if self.bits is not None else None
