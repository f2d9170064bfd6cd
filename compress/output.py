"""An output folder that is written while the run goes and survives an interruption.

The folder is built under a hidden name beside its final place (``.NAME.partial``) and renamed into
place only when it is complete, so an interrupted run never leaves a folder that looks finished.
Unlike a throw-away temporary folder it is kept when the run stops after finishing blocks: it holds
the shards written so far, the hidden states carried out of the last finished block and
``progress.json`` (what ``--resume`` needs to continue at the next block and produce the same bytes
as a run that was never stopped). A state is recorded only after the bytes it points to are on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from compress.blocks import Activations
from compress.errors import UserError
from compress.fsutil import _make_readable, refuse_existing
from compress.shards import ShardWriter

PROGRESS_FILE = "progress.json"
STATE_VERSION = 1


def source_identity(folder: Path) -> list:
    """Cheap identity of a model's weights (names, sizes, modification times)."""
    return [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in sorted(folder.glob("*.safetensors"))]


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PartialOutput:
    """``final``'s folder while it is written; see the module docstring."""

    def __init__(self, final: Path, run_fingerprint: str, resume: bool, force: bool, max_shard_bytes: int,
                 checkpoint_every_s: float = 60.0, say=None) -> None:
        self.final = Path(final)
        self.folder = self.final.parent / f".{self.final.name}.partial"
        self.fingerprint = run_fingerprint
        self.checkpoint_every_s = checkpoint_every_s
        self.say = say or (lambda message: print(message, file=sys.stderr))
        self.progress: dict | None = None
        self._last_checkpoint = time.monotonic()
        refuse_existing(self.final, force)
        resumable = (self.folder / PROGRESS_FILE).is_file()
        if self.folder.exists() and not resumable:
            shutil.rmtree(self.folder)  # killed before its first checkpoint: nothing in it can be used
        elif resumable and not resume:
            if not force:
                raise UserError(f"an interrupted run of {self.final} is kept in {self.folder}: pass --resume to "
                                "continue it, or --force to start again")
            shutil.rmtree(self.folder)
            resumable = False
        if resume and resumable:
            self.progress = self._read_progress()
            self.shards = ShardWriter.resume(self.folder, self.progress["shards"])
            self._drop_stale()
        else:
            if resume:
                self.say(f"nothing to resume for {self.final}: starting at the first block")
            self.folder.mkdir(parents=True)
            self.shards = ShardWriter(self.folder, max_shard_bytes)

    # --- resuming ------------------------------------------------------------------------------

    def _read_progress(self) -> dict:
        progress = json.loads((self.folder / PROGRESS_FILE).read_text())
        if progress.get("version") != STATE_VERSION or progress.get("fingerprint") != self.fingerprint:
            raise UserError(f"the interrupted run in {self.folder} was made with other settings or another source "
                            "model: run the same command as before with --resume, or pass --force to start again")
        return progress

    def _drop_stale(self) -> None:
        """Files written after the recorded state (a later shard, a later activation set) go."""
        saved = Path(self.saved_hidden["folder"]) if self.saved_hidden else None
        activations = self.folder / "activations"
        for path in activations.iterdir() if activations.is_dir() else ():
            if path != saved:
                shutil.rmtree(path, ignore_errors=True)

    @property
    def next_block(self) -> int:
        return self.progress["next_block"] if self.progress else 0

    @property
    def saved_hidden(self) -> dict | None:
        hidden = self.progress.get("hidden") if self.progress else None
        return hidden | {"folder": str(self.folder / hidden["folder"])} if hidden else None

    @property
    def saved(self) -> dict:
        """What the run recorded with its last checkpoint (per-layer statistics...)."""
        return self.progress.get("extra", {}) if self.progress else {}

    @property
    def spill_folder(self) -> Path:
        return self.folder / "activations" / "spill"

    def checkpoint(self, next_block: int, total: int, hidden: Activations | None, extra: dict) -> None:
        """Record that blocks before ``next_block`` are written (if it is time to, or the last block)."""
        due = time.monotonic() - self._last_checkpoint >= self.checkpoint_every_s
        if not due or next_block >= total:
            return
        self.shards.sync()
        saved = None
        previous = (self.progress or {}).get("hidden")
        if hidden is not None:
            where = self.folder / "activations" / f"after-{next_block - 1:05d}"
            saved = hidden.save(where) | {"folder": str(where.relative_to(self.folder))}
        progress = {"version": STATE_VERSION, "fingerprint": self.fingerprint, "next_block": next_block,
                    "shards": self.shards.state(), "hidden": saved, "extra": extra}
        tmp = self.folder / f".{PROGRESS_FILE}.tmp"
        tmp.write_text(json.dumps(progress, default=str))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(self.folder / PROGRESS_FILE)
        if previous and previous["folder"] != (saved or {}).get("folder"):
            shutil.rmtree(self.folder / previous["folder"], ignore_errors=True)
        self.progress = progress
        self._last_checkpoint = time.monotonic()

    # --- ending --------------------------------------------------------------------------------

    def seal(self) -> None:
        """Every block is written: from here the folder is finished, not resumed (its shards get renamed)."""
        (self.folder / PROGRESS_FILE).unlink(missing_ok=True)
        self.progress = None
        shutil.rmtree(self.folder / "activations", ignore_errors=True)

    def complete(self, force: bool) -> Path:
        """Rename the finished folder into place."""
        self.seal()
        _make_readable(self.folder)
        refuse_existing(self.final, force)
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            self.final.rename(old)
            self.folder.rename(self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.folder.rename(self.final)
        return self.final

    def abandon(self) -> None:
        """After an error or an interruption: keep what can be resumed, else remove the folder."""
        if self.progress is not None and (self.folder / PROGRESS_FILE).is_file():
            # Always said (not progress chatter): it is where the work went.
            print(f"{self.progress['next_block']} block(s) are written and kept in {self.folder}: run the same "
                  "command with --resume to continue", file=sys.stderr)
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
