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


def bench_command(request) -> list[str]:
    """The `compress bench` command line of a request (run as a child process)."""
    args = [sys.executable, "-m", "compress.cli", "bench", request.model, "--base", request.base, "--name",
            request.name, "--device", request.device, "--dtype", request.dtype, "--base-dtype", request.base_dtype,
            "--eval", request.eval, "--top-k", str(request.top_k), "--decode-tokens", str(request.decode_tokens),
            "--decode-batches", *map(str, request.decode_batches), "--repeats", str(request.repeats),
            "--out", request.out]
    for flag, value in (("--seqlen", request.seqlen), ("--windows", request.windows),
                        ("--transform", request.transform), ("--tasks", ",".join(request.tasks or []) or None),
                        ("--limit", request.limit), ("--num-fewshot", request.num_fewshot or None)):
        if value is not None:
            args += [flag, str(value)]
    if not request.progress:
        args.append("--no-progress")
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
