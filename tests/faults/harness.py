"""Running a command with one fault injected at a named point, in a child process of its own.

The child wraps one function (``module:Attribute.path``) so that its N-th call first delivers the fault:
SIGKILL (no handler runs: the folder is as the kill leaves it), SIGTERM (what `timeout` and schedulers send),
SIGINT (Ctrl-C), or ENOSPC (a full disk, raised as the OSError the write would raise). Then the command runs
through its real entry point, `compress` or `distill`, exactly as a user starts it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CHILD = r"""
import errno, importlib, os, signal, sys, time

# Ctrl-C reaches a command started at a terminal; a test run started in the background (nohup, `&`, some CI
# runners) starts its children with SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
target, nth, fault, entry = sys.argv[1:5]
module_name, _, attribute = target.partition(":")
owner = importlib.import_module(module_name)
*path, name = attribute.split(".")
for part in path:
    owner = getattr(owner, part)
real = getattr(owner, name)
calls = 0


def faulty(*args, **kwargs):
    global calls
    calls += 1
    if calls == int(nth):
        if fault == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "<injected>")
        os.kill(os.getpid(), getattr(signal, fault))
        time.sleep(30)  # the signal's handler runs (or the kill lands) before this ends
    return real(*args, **kwargs)


setattr(owner, name, faulty)
sys.exit(importlib.import_module(entry).main(sys.argv[5:]))
"""

EXIT_CODES = {"SIGKILL": -9, "SIGTERM": 143, "SIGINT": 130, "ENOSPC": 2}
CLOSING_WORDS = {"SIGTERM": "terminated (SIGTERM): ", "SIGINT": "interrupted (Ctrl-C): ", "ENOSPC": "error: the disk is full"}


@dataclass
class FaultRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def child_env() -> dict:
    return os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def run_with_fault(args: list[str], target: str, nth: int, fault: str, entry: str = "compress.cli",
                   cwd: Path | None = None) -> FaultRun:
    done = subprocess.run([sys.executable, "-c", CHILD, target, str(nth), fault, entry, *args], capture_output=True,
                          text=True, env=child_env(), cwd=cwd, timeout=600)
    return FaultRun(done.returncode, done.stdout, done.stderr)


def run_plain(args: list[str], entry: str = "compress.cli", cwd: Path | None = None) -> FaultRun:
    done = subprocess.run([sys.executable, "-m", entry, *args], capture_output=True, text=True, env=child_env(),
                          cwd=cwd, timeout=600)
    return FaultRun(done.returncode, done.stdout, done.stderr)


def assert_ended_as_expected(run: FaultRun, fault: str, kept: str | None, alone: bool = True) -> None:
    """The exit code of the fault; for a caught one, no traceback and one closing line, the last, that says what
    was kept (``kept``: words it must hold). ``alone``: nothing else was printed (with --no-progress); commands
    whose libraries print while they work (the ONNX exporter) may have other lines before it."""
    assert run.returncode == EXIT_CODES[fault], (run.returncode, run.stderr[-3000:])
    if fault == "SIGKILL":
        return
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    closing = [line for line in run.lines if line.startswith(CLOSING_WORDS[fault])]
    assert len(closing) == 1 and run.lines[-1] == closing[0], run.stderr[-3000:]
    if alone:
        assert len(run.lines) == 1, run.stderr[-3000:]
    if kept:
        assert kept in closing[0], closing[0]


def tree_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (relative path -> digest): a source that is never touched keeps it."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    """What a run for output ``name`` left beside it, the kept partial folder excepted."""
    return sorted(p.name for p in parent.iterdir() if name in p.name and p.name != f".{name}.partial"
                  and p.name != name)
