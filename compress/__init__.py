"""compress-workbench: quantize, prune and distill open LLMs, and measure what it cost."""

import os as _os

__version__ = "0.1.0"

# MKL's strict conditional numerical reproducibility: the same matrix products give the same bits at any thread count.
# On AVX-512 CPUs MKL otherwise splits sums by thread (SparseGPT's masks differed between 1 and 2 threads on an AMX
# Xeon: tests/test_determinism.py). Read when MKL first runs, so set on import, before any product; a value the user
# set wins.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
