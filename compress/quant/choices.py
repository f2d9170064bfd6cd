"""The values a weight-quantization setting may take, without importing torch: the command line's help
and its early checks read them before any heavy import."""

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_SEARCHES = ("none", "mse", "weighted")
ACT_BITS = (8,)
"""Activation bits a W8A8 scheme quantizes to (dynamic, per token, symmetric)."""
