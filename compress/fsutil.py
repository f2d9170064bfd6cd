"""File-system primitives every output shares: refusing an output that exists or would swallow the
source, a lock on an output path, durable writes (fsync of files and folders), and atomic folders
(written under a hidden temporary name, renamed into place when complete, so an interrupted run never
leaves a folder that looks finished). The resumable lifecycle of a model run's output is
compress.output, built on these."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from compress.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; outputs there are not guarded against a second run
    fcntl = None


def refuse_existing(folder: Path, force: bool) -> None:
    if folder.exists() and not force:
        raise UserError(f"output folder {folder} already exists: choose another --out or pass --force to replace it")


def refuse_source_overlap(out: Path, source: Path | None) -> None:
    """An output that is the source folder, or a folder holding it, would be replaced by --force with the
    source inside: refused whatever the flags say (the source model is never modified)."""
    if source is None:
        return
    out, source = Path(out).resolve(), Path(source).resolve()
    if out == source or out in source.parents:
        what = "is the source model's folder" if out == source else f"contains the source model ({source})"
        raise UserError(f"--out {out} {what}: choose an output folder outside it")


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


def settle_killed_exchange(folder: Path) -> None:
    """What a killed ``atomic_folder`` left beside ``folder`` (call holding its lock: no live run owns any of it).
    Its temporary folders held an unfinished output: removed. Killed between the two renames of an exchange, the
    previous output sits in an ``.old-`` folder and ``folder`` is missing: it is put back."""
    for tmp in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in folder.parent.glob(f".{folder.name}.old-*"):
        if (old / folder.name).is_dir() and not folder.exists():
            (old / folder.name).rename(folder)
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(folder: Path, force: bool = False, source: Path | None = None, lock: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``; on success it replaces ``folder``, else it is removed.
    The output path is locked meanwhile (``lock`` False: for cache entries that concurrent builders make
    equal, where the last rename simply wins), and may not be (or hold) ``source``."""
    refuse_source_overlap(folder, source)
    folder.parent.mkdir(parents=True, exist_ok=True)
    held = OutputLock(folder).acquire() if lock else None
    if held is not None:
        settle_killed_exchange(folder)
    try:
        refuse_existing(folder, force)
    except BaseException:
        if held is not None:
            held.release()
        raise
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        _make_readable(tmp)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            folder.rename(old / folder.name)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if held is not None:
            held.release()


def _make_readable(folder: Path) -> None:
    """mkdtemp creates 0700 folders; give the output the permissions a normal mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
