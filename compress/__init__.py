"""compress-workbench: quantize, prune and distill open LLMs, and measure what it cost."""

__version__ = "0.1.0"
