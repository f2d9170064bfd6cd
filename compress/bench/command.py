"""A bench request as the `compress bench` command line that runs it in a child process: each model measured
in its own process has a peak memory of its own (a sweep's variants, a recipe's stages)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from compress.bench.result import BenchResult
from compress.errors import UserError
from compress.interrupt import EXIT_INTERRUPTED, EXIT_TERMINATED


_VALUE_FLAGS = ("base", "name", "device", "dtype", "base_dtype", "transform", "backend", "eval", "seqlen", "bos",
                "windows", "batch_size", "top_k", "task", "limit", "num_fewshot", "decode_tokens", "prompt_tokens",
                "task_batch", "warmup", "repeats", "out")
"""BenchRequest fields passed as ``--flag value`` (underscores as dashes)."""


def bench_command(request) -> list[str]:
    """The `compress bench` command line of a request (run as a child process): every setting it holds, so the
    child measures exactly what was asked (a test parses it back into the same request)."""
    args = [sys.executable, "-m", "compress.cli", "bench", request.model]
    for name in _VALUE_FLAGS:
        value = getattr(request, name)
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    args += ["--decode-batches", *map(str, request.decode_batches)]
    if request.tasks:
        args += ["--tasks", ",".join(request.tasks)]
    args += [flag for flag, on in (("--no-speed", not request.speed), ("--no-progress", not request.progress),
                                   ("--trust-remote-code", request.trust_remote_code)) if on]
    return args


def bench_in_child(request) -> BenchResult:
    """Run ``request`` (its ``out`` set) as `compress bench` in a child process and read its result. The child's
    Ctrl-C or SIGTERM is this run's too."""
    completed = subprocess.run(bench_command(request), env=os.environ | {"PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.DEVNULL)
    if completed.returncode in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        raise KeyboardInterrupt
    if completed.returncode != 0:
        raise UserError(f"benchmark of {request.name} failed (exit {completed.returncode}); its output is above")
    return BenchResult.read(Path(request.out))
