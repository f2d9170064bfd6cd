"""The machine's memory read bandwidth, measured here: the physical ceiling of batch-1 decode.

Decoding one token reads every weight once, so weight bytes x tokens/s cannot exceed the rate at
which the device streams memory. We time a full reduction over a buffer far larger than any cache
(read-only traffic, like a weight read) with the same threads the model uses.
"""

from __future__ import annotations

import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth_gbps(device: torch.device, megabytes: int | None = None, repeats: int = 7) -> float:
    """Median GB/s (1e9 bytes) of ``tensor.sum()`` over ``megabytes`` of float32 after one warm-up."""
    megabytes = megabytes or (2048 if device.type == "cuda" else 512)
    buffer = torch.ones(megabytes * (1 << 20) // 4, dtype=torch.float32, device=device)
    nbytes = buffer.numel() * 4
    times = []
    for i in range(repeats + 1):
        _sync(device)
        started = time.perf_counter()
        buffer.sum()
        _sync(device)
        if i:  # the first pass is the warm-up (page faults, clocks)
            times.append(time.perf_counter() - started)
    del buffer
    return nbytes / statistics.median(times) / 1e9
