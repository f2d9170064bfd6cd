"""Process-level facts: which device to run on, thread settings, peak memory, library versions."""

from __future__ import annotations

import os
import platform
import resource
import sys

import torch

from compress.errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """The device asked for; a CUDA request without a GPU is an error, never a silent CPU run."""
    if name not in DEVICE_CHOICES:
        raise UserError(f"unknown device '{name}': choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu (or auto)")
    return torch.device(name)


def return_freed_memory() -> None:
    """Hand memory that is free inside the process back to the system (glibc's malloc_trim).

    Blocks are freed whole after each step, but glibc keeps freed heap chunks below its (dynamically
    rising) mmap threshold, so without this the resident set creeps up block after block by
    fragmentation alone. A no-op where the C library has no malloc_trim."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _status_bytes(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status (Linux reports KiB); None where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux VmRSS; 0 where unknown)."""
    return _status_bytes("VmRSS") or 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM (which /proc/self/clear_refs can reset), else the
    peak since the process started (getrusage)."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _installed_version(distribution: str) -> str | None:
    """A package's version from its metadata, without importing it (None where it is not installed)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """What a result's figures depend on besides the model: versions, threads, and the CPU's
    kernel-picking instruction sets (compress.cpu_features)."""
    import transformers

    from compress import __version__
    from compress.cpu_features import cpu_features

    info = {
        "compress": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "onnxruntime": _installed_version("onnxruntime"),
        "cpu": cpu_features().to_dict(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info
