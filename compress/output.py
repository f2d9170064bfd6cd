"""The one lifecycle of a model run's output folder: begin -> checkpoint ... -> finish | abandon.

A streaming run writes ``NAME`` under the hidden ``.NAME.partial`` beside it and renames it into place
only when complete, so an interrupted run never leaves a folder that looks finished, and it keeps what
an interruption must not lose: the shards written so far, the hidden states carried out of the last
checkpointed block, and ``progress.json`` (what ``--resume`` needs to continue and write the bytes an
uninterrupted run writes). A progress record is written only after the bytes it points to are durable.

States of the partial folder, and what each command does with it:

============================  ===================================  ==========================================
state                         how it came to be                    next run on the same --out
============================  ===================================  ==========================================
absent                        no run, or one that completed        starts
no progress.json              stopped before its first checkpoint  removed (nothing in it can be used); starts
progress, phase "blocks"      stopped after checkpointing block k  --resume: continues at block k+1;
                                                                   --force: removed, starts again;
                                                                   neither: one-line error naming both
progress, phase "finishing"   every block written; the finish      --resume: finishes it (shards, metadata,
                              (closing shards, metadata, the       exchange) without redoing any block;
                              exchange) failed or was killed       --force / neither: as above
in place with progress.json   killed between the exchange and      completed: the record and the replaced
                              dropping the record                  output (.NAME.old) are removed
============================  ===================================  ==========================================

``.NAME.old`` holds the output a --force run replaces, only during the exchange. Found without ``NAME``
(killed between the two renames) it is put back, unless a --resume is about to finish the exchange.
``.NAME.lock`` is held (flock) by the run writing NAME: a second run on the same --out gets an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from compress.activations import Activations
from compress import interrupt
from compress.errors import UserError
from compress.fsutil import OutputLock, _make_readable, fsync_path, fsync_tree, refuse_existing, refuse_source_overlap
from compress.shards import ShardWriter, weight_files

PROGRESS_FILE = "progress.json"
STATE_VERSION = 2
BLOCKS, FINISHING = "blocks", "finishing"


def source_identity(folder: Path) -> dict:
    """Cheap identity of a source model: its weight files (names, sizes, modification times) and the
    hash of its config.json."""
    config = folder / "config.json"
    return {"files": [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in weight_files(folder)],
            "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None}


def _phase(record: Path) -> str | None:
    """The phase a progress record of ours names (None for no record, or a file that is not ours)."""
    try:
        progress = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return progress.get("phase") if isinstance(progress, dict) and "fingerprint" in progress else None


class ModelOutput:
    """``final``'s folder while a run writes it; see the module docstring for its states."""

    def __init__(self, final: Path, run_fingerprint: str, *, resume: bool, force: bool, max_shard_bytes: int,
                 checkpoint_every_s: float = 60.0, source: Path | None = None, say=None) -> None:
        self.final = Path(final)
        self.folder = self.final.parent / f".{self.final.name}.partial"
        self.old = self.final.parent / f".{self.final.name}.old"
        self.fingerprint = run_fingerprint
        self.force = force
        self.checkpoint_every_s = checkpoint_every_s
        self.say = say or (lambda message: print(message, file=sys.stderr))
        self.progress: dict | None = None
        self._last_checkpoint = time.monotonic()
        refuse_source_overlap(self.final, source)
        self.lock = OutputLock(self.final).acquire()
        try:
            self._begin(resume, max_shard_bytes)
        except BaseException:
            self.lock.release()
            raise

    # --- begin ---------------------------------------------------------------------------------

    def _begin(self, resume: bool, max_shard_bytes: int) -> None:
        self._settle_earlier_exchange(resume)
        refuse_existing(self.final, self.force)
        progress = self._read_progress() if (self.folder / PROGRESS_FILE).is_file() else None
        if self.folder.exists() and progress is None:
            shutil.rmtree(self.folder)  # stopped before its first checkpoint: nothing in it can be used
        elif progress is not None and not resume:
            if not self.force:
                raise UserError(f"an interrupted run of {self.final} is kept in {self.folder}: pass --resume to "
                                "continue it, or --force to start again")
            shutil.rmtree(self.folder)
            progress = None
        if progress is not None:
            if progress.get("version") != STATE_VERSION or progress.get("fingerprint") != self.fingerprint:
                raise UserError(f"the interrupted run in {self.folder} was made with other settings, another source "
                                "model or other calibration text: run the same command as before with --resume, or "
                                "drop --resume and pass --force to start again")
            self.progress = progress
            self.shards = ShardWriter.resume(self.folder, progress["shards"])
            self._drop_stale()
        else:
            if resume:
                self.say(f"nothing to resume for {self.final}: starting at the first block")
            self.folder.mkdir(parents=True)
            self.shards = ShardWriter(self.folder, max_shard_bytes)

    def _settle_earlier_exchange(self, resume: bool) -> None:
        """Complete or undo an exchange of folders that a kill interrupted (see the module docstring)."""
        record = self.final / PROGRESS_FILE
        if record.is_file() and _phase(record) == FINISHING:  # the new output is in place: only the clean-up was missed
            record.unlink()
            shutil.rmtree(self.old, ignore_errors=True)
            self.say(f"{self.final} was complete; removed the progress record an interrupted exchange left in it")
        if not self.old.exists():
            return
        if self.final.exists():
            shutil.rmtree(self.old)
        elif not (resume and _phase(self.folder / PROGRESS_FILE) == FINISHING):
            self.old.rename(self.final)
            self.say(f"put back {self.final}, which an interrupted run had moved aside to replace it")

    def _read_progress(self) -> dict:
        try:
            return json.loads((self.folder / PROGRESS_FILE).read_text())
        except ValueError:
            raise UserError(f"{self.folder / PROGRESS_FILE} is damaged: pass --force to start again")

    def _drop_stale(self) -> None:
        """Files written after the recorded state (a later activation set) go."""
        saved = Path(self.saved_hidden["folder"]) if self.saved_hidden else None
        activations = self.folder / "activations"
        for path in activations.iterdir() if activations.is_dir() else ():
            if path != saved:
                shutil.rmtree(path, ignore_errors=True)

    # --- what a resumed run continues from -------------------------------------------------------

    @property
    def next_block(self) -> int:
        return self.progress["next_block"] if self.progress else 0

    @property
    def finishing(self) -> bool:
        """Every block was written by an earlier run; only the finish is left."""
        return bool(self.progress) and self.progress.get("phase") == FINISHING

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

    # --- checkpoint ----------------------------------------------------------------------------

    def checkpoint(self, next_block: int, total: int, hidden: Activations | None, extra: dict) -> None:
        """Record that blocks before ``next_block`` are written (if it is time to; the last block is
        recorded by ``finish``)."""
        due = time.monotonic() - self._last_checkpoint >= self.checkpoint_every_s
        if not due or next_block >= total:
            return
        self.shards.sync()
        saved = None
        previous = (self.progress or {}).get("hidden")
        if hidden is not None:
            where = self.folder / "activations" / f"after-{next_block - 1:05d}"
            saved = hidden.save(where) | {"folder": str(where.relative_to(self.folder))}
            fsync_tree(where)
        self._record(BLOCKS, next_block, saved, extra)
        if previous and previous["folder"] != (saved or {}).get("folder"):
            shutil.rmtree(self.folder / previous["folder"], ignore_errors=True)

    def _record(self, phase: str, next_block: int, hidden: dict | None, extra: dict) -> None:
        """progress.json, atomically and durably, after everything it points to."""
        fsync_path(self.folder)
        progress = {"version": STATE_VERSION, "fingerprint": self.fingerprint, "phase": phase,
                    "next_block": next_block, "shards": self.shards.state(), "hidden": hidden, "extra": extra}
        tmp = self.folder / f".{PROGRESS_FILE}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(progress, default=str))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.folder / PROGRESS_FILE)
        fsync_path(self.folder)
        self.progress = progress
        self._last_checkpoint = time.monotonic()

    # --- finish / abandon ------------------------------------------------------------------------

    def finish(self, total_blocks: int, extra: dict, write_metadata: Callable[[Path], None]) -> Path:
        """Every block is written: record that (so a failure from here on is finished by --resume, not
        redone), close the shards, ``write_metadata(folder)`` (config, tokenizer, manifest), make it
        all durable, exchange the folders, and only then drop the progress record."""
        self.shards.close()
        self._record(FINISHING, total_blocks, None, extra)
        shutil.rmtree(self.folder / "activations", ignore_errors=True)
        self.shards.finish()
        write_metadata(self.folder)
        _make_readable(self.folder)
        fsync_tree(self.folder)
        refuse_existing(self.final, self.force)  # something appeared there while the run went
        if self.final.exists():
            shutil.rmtree(self.old, ignore_errors=True)
            self.final.rename(self.old)
        self.folder.rename(self.final)
        fsync_path(self.final.parent)
        (self.final / PROGRESS_FILE).unlink()
        shutil.rmtree(self.old, ignore_errors=True)
        fsync_path(self.final.parent)
        self.progress = None
        self.lock.release()
        return self.final

    def abandon(self) -> None:
        """After an error or an interruption: keep every resumable byte and say where, or remove a folder
        that holds nothing resumable."""
        try:
            if self.progress is not None and (self.folder / PROGRESS_FILE).is_file():
                done = ("all blocks are written" if self.finishing else
                        f"{self.progress['next_block']} block(s) are written")
                # Always said (not progress chatter): it is where the work went. The command's closing line (the
                # error, or what stopped it) says it.
                interrupt.keep(f"{done} and kept in {self.folder}: run the same command with --resume to "
                               f"{'finish' if self.finishing else 'continue'}")
            elif self.folder.exists():
                shutil.rmtree(self.folder, ignore_errors=True)
        finally:
            self.lock.release()
