"""How a run that is stopped ends: Ctrl-C (SIGINT) and SIGTERM (what `timeout`, a scheduler or a container stop
sends) take the same path, so the same cleanup runs, and the command ends with one line saying what was kept.

SIGTERM's default action kills the process where it stands: no `finally` runs, a temporary folder stays behind
and the user is told nothing. Raised as ``Terminated`` (a KeyboardInterrupt) in the main thread instead, it
unwinds like Ctrl-C. Whatever keeps work for later (a partial output for --resume, a sweep's finished rows)
says so through ``keep``; the command line prints it in the one closing line.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

EXIT_INTERRUPTED = 130
"""128 + SIGINT, what shells report for Ctrl-C."""
EXIT_TERMINATED = 143
"""128 + SIGTERM."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so every cleanup written for Ctrl-C runs."""


_kept: list[str] = []


def keep(what: str) -> None:
    """Record what an interrupted run leaves for later, e.g. '3 block(s) are written and kept in X: ...'."""
    _kept.append(what)


def kept() -> list[str]:
    return list(_kept)


def forget() -> None:
    """A new command starts: nothing is kept yet."""
    _kept.clear()


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While inside: SIGTERM raises ``Terminated``. Outside the main thread signals cannot be caught: no-op."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def closing_line(exc: KeyboardInterrupt, nothing_kept: str) -> tuple[str, int]:
    """(the one line an interrupted command ends with, its exit code)."""
    how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted (Ctrl-C)"
    code = EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    return f"{how}: {'; '.join(_kept) or nothing_kept}", code


def with_kept(message: str) -> str:
    """An error's one line, with what the failed run kept for later."""
    return "; ".join([message, *_kept])
