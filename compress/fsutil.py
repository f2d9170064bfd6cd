"""File-system primitives every output shares: a lock on an output path, durable writes (fsync of files
and folders) and the permissions of a finished folder. The lifecycle of an output (what may be replaced,
the partial folder, the exchange) is compress.output, built on these."""

from __future__ import annotations

import os
from pathlib import Path

from compress.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; outputs there are not guarded against a second run
    fcntl = None


def fsync_path(path: Path) -> None:
    """Make a file's bytes, or a folder's entries, durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the files' own fsync still holds
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then the folders themselves (deepest first)."""
    folders = [folder]
    for path in folder.rglob("*"):
        if path.is_dir():
            folders.append(path)
        else:
            fsync_path(path)
    for path in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)


class OutputLock:
    """An exclusive lock on one output path (``.NAME.lock`` beside it), held while a run writes it, so
    a second run on the same --out stops with an error instead of writing into the first one's files.
    The kernel drops it when the process dies, so a killed run never leaves a stale lock."""

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        self.path = self.final.parent / f".{self.final.name}.lock"
        self.fd: int | None = None

    def acquire(self) -> "OutputLock":
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UserError(f"another run (process {holder}) is writing {self.final}: "
                                "wait for it to end, or choose another --out")
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file its last holder removed between our open and our lock
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def make_readable(folder: Path) -> None:
    """mkdtemp creates 0700 folders; give the output the permissions a normal mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
