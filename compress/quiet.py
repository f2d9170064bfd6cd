"""Third-party start-up messages that are not about the user's run, dropped by name.

Importing transformers imports torchao where it is installed (the `[torchao]` extra), and torchao logs a
"Failed to load ... .so" warning for each optional CUDA kernel library built for another Python or GPU, then
registers enums in a way torch 2.13 logs as deprecated. Neither changes anything we run; a newcomer reads
them as failures. Only these messages are dropped: any other warning of those libraries still shows.
"""

from __future__ import annotations

import logging
import re

KNOWN_NOISE: dict[str, re.Pattern] = {
    # torchao/__init__.py: an optional kernel library that cannot load on this machine.
    "torchao": re.compile(r"Failed to load .*\.so\b"),
    # torchao/kernel/intmm.py: Triton is a GPU compiler; CPU runs never use it.
    "torchao.kernel.intmm": re.compile(r"Detected no triton"),
    # torch/utils/_pytree.py: torchao registers enums as pytree constants, deprecated in torch 2.13.
    "torch.utils._pytree": re.compile(r"is an Enum subclass and is now natively supported by torch\.compile"),
}


class _DropKnown(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def silence_known_noise() -> None:
    """Install the filters (idempotent); call before the first import of transformers."""
    for name, pattern in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(pattern))
