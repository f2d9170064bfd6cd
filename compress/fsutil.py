"""Atomic output folders: written under a hidden temporary name, renamed into place when complete,
so an interrupted run never leaves a folder that looks finished."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from compress.errors import UserError


def refuse_existing(folder: Path, force: bool) -> None:
    if folder.exists() and not force:
        raise UserError(f"output folder {folder} already exists: choose another --out or pass --force to replace it")


@contextmanager
def atomic_folder(folder: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``; on success it replaces ``folder``, else it is removed."""
    refuse_existing(folder, force)
    folder.parent.mkdir(parents=True, exist_ok=True)
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


def _make_readable(folder: Path) -> None:
    """mkdtemp creates 0700 folders; give the output the permissions a normal mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
