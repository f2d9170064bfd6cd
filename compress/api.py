"""The Python API, the thin public face of the commands that change a model: ``quantize(QuantizeRequest)``
(compress.quant.run) and ``prune(PruneRequest)`` (compress.prune.run) each do load -> calibrate -> change ->
save, streaming one block at a time by default. The CLI is a thin layer over this; tests and benchmarks call it
directly."""

from __future__ import annotations

from compress.fingerprint import source_hash
from compress.prune.run import PruneRequest, PruneResult, prune
from compress.quant.request import METHOD_OPTIONS, QuantizeRequest, config_fields, methods_taking, takes_option
from compress.quant.run import QuantizeResult, quantize

__all__ = ["QuantizeRequest", "QuantizeResult", "quantize", "PruneRequest", "PruneResult", "prune", "source_hash",
           "METHOD_OPTIONS", "config_fields", "methods_taking", "takes_option"]
