"""Known third-party start-up noise is dropped by name; every other message of those loggers still shows."""

import logging

from compress.quiet import silence_known_noise


def test_known_messages_are_dropped_and_others_kept(caplog):
    silence_known_noise()
    silence_known_noise()  # idempotent: one filter per logger
    assert sum(type(f).__name__ == "_DropKnown" for f in logging.getLogger("torchao").filters) == 1
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load")
        logging.getLogger("torch.utils._pytree").warning(
            "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type.", "E")
        logging.getLogger("torchao").warning("quantization of layer x failed")
        logging.getLogger("torch.utils._pytree").warning("something else")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["quantization of layer x failed", "something else"]
