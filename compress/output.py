"""The one lifecycle of every output a command writes (a model folder, an ONNX export, a student, a report, a
GGUF file): begin -> [checkpoint ...] -> finish | abandon, and the one rule of what ``--force`` may replace.

Beside an output ``NAME`` every command uses the same names:

* ``.NAME.partial``: the output while it is written; renamed to ``NAME`` only when complete, so an interrupted
  run never leaves a folder that looks finished. A block-by-block run (quantize, prune) keeps in it what an
  interruption must not lose: the shards written so far, the hidden states carried out of the last
  checkpointed block, and ``progress.json`` (written only after the bytes it points to are durable).
* ``.NAME.old``: the output a ``--force`` run replaces, only during the exchange.
* ``.NAME.lock``: held (flock) by the run writing ``NAME``; a second run on the same ``--out`` gets an error.

Inside a finished folder, ``.compress-output.json`` lists every file our writer put there. ``--force`` replaces
a folder only when everything in it is so listed (a complete earlier output of ours) or it is empty; anything
else is refused with one line naming what is there, whatever the flags. An ``--out`` that is the source model,
holds it or lies inside it is refused too. A GGUF file is ours when its metadata says so (``general.quantized_by``).

States, and what the next run on the same ``--out`` does with them. Every command settles them the same way
when it begins (``begin``), so a kill in one kind of command is settled by any other:

============================  ===================================  ==========================================
state                         how it came to be                    next run on the same --out
============================  ===================================  ==========================================
no partial                    no run, or one that completed        starts
partial, no progress.json     stopped before its first checkpoint  removed (nothing in it can be used); starts
                              (or a whole-at-once writer stopped)
progress, phase "blocks"      stopped after checkpointing block k  --resume: continues at block k+1;
                                                                   --force: removed, starts again;
                                                                   neither: one-line error naming both;
                                                                   a whole-at-once command: error naming
                                                                   --resume of the command that made it, or
                                                                   --force
progress, phase "finishing"   every block written; the finish      --resume: finishes it (shards, metadata,
                              (closing shards, metadata, the       exchange) without redoing any block;
                              exchange) failed or was killed       otherwise as above
progress damaged              a foreign or truncated record        --force (without --resume) starts again;
                                                                   --resume: one line saying that
.NAME.old without NAME        killed between the two renames       put back, unless a --resume is about to
                              of an exchange                       finish the exchange
.NAME.old beside NAME         killed after the second rename       removed
NAME with progress.json       killed between the exchange and      completed: the record and .NAME.old are
                              dropping the record                  removed
============================  ===================================  ==========================================

An interrupted block-by-block run keeps exactly what ``--resume`` needs (the shards, the recorded hidden states,
the record) and says how many bytes that is; the activations it was carrying are dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from compress import interrupt
from compress.errors import UserError
from compress.fsutil import OutputLock, fsync_path, fsync_tree, make_readable

if TYPE_CHECKING:
    from compress.activations import Activations

PROGRESS_FILE = "progress.json"
INVENTORY_FILE = ".compress-output.json"
WRITER = "compress-workbench"
MANIFEST_NAME = "compress_manifest.json"
"""What a model folder of ours says about how it was made (written by ``compress.checkpoint``)."""
LEGACY_MANIFESTS = (MANIFEST_NAME, "distill.json")
"""Manifests that outputs of versions before the inventory carried: named in the refusal, never replaced."""
STATE_VERSION = 2
BLOCKS, FINISHING = "blocks", "finishing"
_NOT_INVENTORIED = (PROGRESS_FILE, f".{PROGRESS_FILE}.tmp", INVENTORY_FILE)


def partial_of(final: Path) -> Path:
    return final.parent / f".{final.name}.partial"


def old_of(final: Path) -> Path:
    return final.parent / f".{final.name}.old"


# --- what an --out may be --------------------------------------------------------------------------------


def refuse_source_overlap(out: Path, source: Path | None) -> None:
    """An output that is the source, holds it or lies inside it would replace or be mixed into the source:
    refused whatever the flags say (the source model is never modified)."""
    if source is None:
        return
    out, source = Path(out).resolve(), Path(source).resolve()
    if out == source:
        what = "is the source model's folder"
    elif out in source.parents:
        what = f"contains the source model ({source})"
    elif source in out.parents:
        what = f"is inside the source model's folder ({source})"
    else:
        return
    raise UserError(f"--out {out} {what}: choose an output folder outside it")


def refuse_output_of_source(out: Path, model_reference: str) -> None:
    """The overlap check for a model named by a local path, before anything is resolved (so that an --out equal
    to the source is named as such, not as an existing folder to --force)."""
    if Path(model_reference).exists():
        refuse_source_overlap(out, Path(model_reference))


def _listed(names) -> str:
    names = list(names)
    shown = names[:5] if len(names) <= 6 else names[:5] + [f"{len(names) - 5} more"]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} and {shown[-1]}"


def _inventory(folder: Path) -> set[str] | None:
    try:
        record = json.loads((folder / INVENTORY_FILE).read_text())
    except (OSError, ValueError):
        return None
    files = record.get("files") if isinstance(record, dict) and record.get("written_by") == WRITER else None
    return set(files) if isinstance(files, list) and all(isinstance(f, str) for f in files) else None


def foreign_entries(folder: Path) -> list[str]:
    """The top-level entries of ``folder`` that our writer did not put there (folders end in '/'): every entry
    when it has no inventory of ours, none for an empty folder or a complete earlier output of ours. A folder our
    inventory does not reach is not walked (an --out of someone's home folder answers at once)."""
    listed = _inventory(folder) or set()
    listed_dirs = {p.as_posix() for f in listed for p in Path(f).parents if p != Path(".")}

    def foreign(path: Path) -> bool:
        relative = path.relative_to(folder).as_posix()
        if path.is_dir() and not path.is_symlink():
            return relative not in listed_dirs or any(foreign(child) for child in path.iterdir())
        return relative not in listed

    return sorted(entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else "")
                  for entry in folder.iterdir() if entry.name != INVENTORY_FILE and foreign(entry))


def refuse_existing(final: Path, force: bool) -> None:
    """What may stand at ``final`` before a run replaces it: nothing; with ``force``, an empty folder or a complete
    earlier output of ours. Anything else is refused with one line naming what is there, force or not."""
    if not os.path.lexists(final):
        return
    if not final.is_dir():
        raise UserError(f"--out {final} is a file, not an output folder of ours: choose another --out")
    foreign = foreign_entries(final)
    if foreign and _inventory(final) is None and any((final / m).is_file() for m in LEGACY_MANIFESTS):
        raise UserError(f"{final} was written by a compress-workbench too old to record its files, so it is not "
                        "replaced: remove it yourself, or choose another --out")
    if foreign:
        raise UserError(f"{final}/ holds {_listed(foreign)}, which this command did not write; choose another --out")
    if not force:
        raise UserError(f"output folder {final} already exists: choose another --out or pass --force to replace it")


def refuse_existing_file(target: Path, force: bool) -> None:
    """The same rule for an output that is one file (a GGUF): with ``force`` it replaces only a file of ours."""
    if not os.path.lexists(target):
        return
    if target.is_dir():
        raise UserError(f"--out {target} is a folder: --out names the file to write, e.g. {target / 'model.gguf'}")
    if not _gguf_of_ours(target):
        raise UserError(f"{target} exists and was not written by compress-workbench: choose another --out")
    if not force:
        raise UserError(f"{target} exists: pass --force to replace it, or --out another file")


def _gguf_of_ours(path: Path) -> bool:
    try:
        from gguf import GGUFReader

        field = GGUFReader(path).fields.get("general.quantized_by")
        return field is not None and bytes(field.parts[field.data[0]]).decode() == WRITER
    except Exception:  # not a GGUF file at all: not ours
        return False


def seal(folder: Path) -> None:
    """Record every file our writer put into ``folder`` (the inventory --force checks), last before the exchange."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if not p.is_dir() and p.relative_to(folder).as_posix() not in _NOT_INVENTORIED)
    (folder / INVENTORY_FILE).write_text(json.dumps({"written_by": WRITER, "files": files}, indent=1) + "\n")


# --- begin: the one settling of what earlier runs left ------------------------------------------------------


def _phase(record: Path) -> str | None:
    """The phase a progress record of ours names (None for no record, or a file that is not ours)."""
    try:
        progress = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return progress.get("phase") if isinstance(progress, dict) and "fingerprint" in progress else None


def _settle_exchange(final: Path, finishing_resume: bool, say: Callable[[str], None]) -> None:
    """Complete or undo an exchange of folders that a kill interrupted (see the module docstring)."""
    old = old_of(final)
    record = final / PROGRESS_FILE
    if record.is_file() and _phase(record) == FINISHING:  # the new output is in place: only the clean-up was missed
        record.unlink()
        shutil.rmtree(old, ignore_errors=True)
        say(f"{final} was complete; removed the progress record an interrupted exchange left in it")
    if not os.path.lexists(old):
        return
    if os.path.lexists(final):
        shutil.rmtree(old)
    elif not (finishing_resume and _phase(partial_of(final) / PROGRESS_FILE) == FINISHING):
        old.rename(final)
        say(f"put back {final}, which an interrupted run had moved aside to replace it")


def read_progress(partial: Path) -> dict:
    """The progress record of a kept partial folder, checked: a damaged one is one line with a command that works."""
    record = partial / PROGRESS_FILE
    try:
        progress = json.loads(record.read_text())
        if not isinstance(progress, dict):
            raise ValueError(f"a JSON {type(progress).__name__}, not a record")
        missing = [k for k in ("version", "fingerprint", "phase", "next_block", "shards") if k not in progress]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        if progress["phase"] not in (BLOCKS, FINISHING) or not isinstance(progress["next_block"], int):
            raise ValueError("an unknown phase or block")
        if not isinstance(progress["shards"], dict) or not isinstance(progress.get("extra", {}), dict):
            raise ValueError("a malformed shard or extra record")
        hidden = progress.get("hidden")
        if hidden is not None and not (isinstance(hidden, dict) and isinstance(hidden.get("folder"), str)):
            raise ValueError("a malformed hidden-state record")
    except (OSError, ValueError) as exc:
        raise UserError(f"{record} is damaged ({exc}): run the same command without --resume and with --force to "
                        "start again")
    return progress


def _settle_partial(final: Path, *, force: bool, resume: bool, resumable: bool) -> dict | None:
    """What to do with a partial folder an earlier run left; returns the progress record to resume from."""
    partial = partial_of(final)
    if not os.path.lexists(partial):
        return None
    if not partial.is_dir() or not (partial / PROGRESS_FILE).is_file() or (force and not resume):
        _remove(partial)  # nothing in it can be used, or the user asked to start again
        return None
    if not resumable:
        raise UserError(f"an interrupted block-by-block run of {final} is kept in {partial}: finish it with the "
                        "command that made it and --resume, or pass --force to discard it")
    if not resume:
        raise UserError(f"an interrupted run of {final} is kept in {partial}: pass --resume to continue it, or "
                        "--force to start again")
    return read_progress(partial)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def begin(final: Path, *, force: bool, resume: bool, source: Path | None, resumable: bool,
          say: Callable[[str], None]) -> tuple[OutputLock, dict | None]:
    """Refuse an --out that overlaps the source, lock it, settle what earlier runs left (any command's), and
    refuse what may not be replaced. Returns the held lock and the progress record to resume from (or None)."""
    refuse_source_overlap(final, source)
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(final).acquire()
    try:
        _settle_exchange(final, resume and resumable, say)
        refuse_existing(final, force)
        return lock, _settle_partial(final, force=force, resume=resume, resumable=resumable)
    except BaseException:
        lock.release()
        raise


def _exchange(partial: Path, final: Path, force: bool) -> None:
    """Put the complete ``partial`` in place of ``final`` (replacing an earlier output of ours only with
    ``force``); the caller drops what the exchange leaves (the old output, a progress record)."""
    try:
        refuse_existing(final, force)
    except UserError:  # checked when the run began: it appeared while the run went
        raise UserError(f"{final} appeared while this run was writing it and is not replaced: move it away (or, if "
                        "it is an earlier output of ours, add --force)") from None
    if os.path.lexists(final):
        _move_aside(final)
    _put_in_place(partial, final)


def _move_aside(final: Path) -> None:
    """The exchange's first rename: a kill after it leaves ``.NAME.old`` without ``NAME`` (put back by ``begin``)."""
    old = old_of(final)
    shutil.rmtree(old, ignore_errors=True)
    final.rename(old)


def _put_in_place(partial: Path, final: Path) -> None:
    """The exchange's second rename."""
    partial.rename(final)
    fsync_path(final.parent)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# --- outputs written whole ----------------------------------------------------------------------------------


@contextmanager
def atomic_folder(final: Path, force: bool = False, source: Path | None = None,
                  say: Callable[[str], None] = _stderr) -> Iterator[Path]:
    """Yield ``.NAME.partial`` for a command that writes its output at once; on success it is sealed and
    replaces ``final``, else it is removed. The --out is locked meanwhile, and may not overlap ``source``."""
    final = Path(final)
    lock, _ = begin(final, force=force, resume=False, source=source, resumable=False, say=say)
    partial = partial_of(final)
    try:
        partial.mkdir()
        yield partial
        seal(partial)
        make_readable(partial)
        fsync_tree(partial)
        _exchange(partial, final, force)
        shutil.rmtree(old_of(final), ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        lock.release()


@contextmanager
def cache_entry(final: Path) -> Iterator[Path]:
    """A cache entry built by whoever needs it first: no lock (builders may run at once), a partial folder of
    its own, and the first complete entry wins (builders of one entry write equal ones)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield partial
        make_readable(partial)
        if final.exists():
            shutil.rmtree(partial)
        else:
            partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


@contextmanager
def atomic_file(target: Path, force: bool = False, source: Path | None = None) -> Iterator[Path]:
    """Yield ``.NAME.partial`` for an output that is one file; on success it replaces ``target`` (only a file
    of ours, with ``force``)."""
    target = Path(target)
    refuse_source_overlap(target, source)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(target).acquire()
    partial = partial_of(target)
    try:
        refuse_existing_file(target, force)
        if os.path.lexists(partial):
            _remove(partial)
        yield partial
        refuse_existing_file(target, force)
        partial.replace(target)
        fsync_path(target.parent)
    except BaseException:
        if os.path.lexists(partial):
            _remove(partial)
        raise
    finally:
        lock.release()


# --- outputs written block by block -------------------------------------------------------------------------


class BlockCheckpoints:
    """The driver's ``block_done`` for a run writing ``output``: after each block, a checkpoint recording
    ``record.to_dict()`` (the method's own resumable record) beside the weights."""

    def __init__(self, output: "ModelOutput", total_blocks: int, record) -> None:
        self.output, self.total_blocks, self.record = output, total_blocks, record

    def __call__(self, index: int, hidden: "Activations | None") -> None:
        self.output.checkpoint(index + 1, self.total_blocks, hidden, self.record.to_dict())


def source_identity(folder: Path) -> dict:
    """Cheap identity of a source model: its weight files (names, sizes, modification times) and the
    hash of its config.json."""
    from compress.shards import weight_files

    config = folder / "config.json"
    return {"files": [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in weight_files(folder)],
            "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None}


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


class ModelOutput:
    """``final``'s folder while a block-by-block run writes it; see the module docstring for its states."""

    def __init__(self, final: Path, run_fingerprint: str, *, resume: bool, force: bool, max_shard_bytes: int,
                 checkpoint_every_s: float = 60.0, source: Path | None = None, say=None) -> None:
        self.final = Path(final)
        self.folder = partial_of(self.final)
        self.old = old_of(self.final)
        self.fingerprint = run_fingerprint
        self.force = force
        self.checkpoint_every_s = checkpoint_every_s
        self.say = say or _stderr
        self.progress: dict | None = None
        self._last_checkpoint = time.monotonic()
        self.lock, progress = begin(self.final, force=force, resume=resume, source=source, resumable=True,
                                    say=self.say)
        try:
            self._open(progress, resume, max_shard_bytes)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, progress: dict | None, resume: bool, max_shard_bytes: int) -> None:
        from compress.shards import ShardWriter

        if progress is not None:
            if progress["version"] != STATE_VERSION or progress["fingerprint"] != self.fingerprint:
                raise UserError(f"the interrupted run in {self.folder} was made with other settings, another source "
                                "model or other calibration text: run the same command as before with --resume, or "
                                "drop --resume and pass --force to start again")
            self.progress = progress
            try:
                self.shards = ShardWriter.resume(self.folder, progress["shards"])
            except (KeyError, TypeError, ValueError, OSError) as exc:
                raise UserError(f"{self.folder / PROGRESS_FILE} is damaged (its shard record does not match the "
                                f"files: {exc}): run the same command without --resume and with --force to start "
                                "again") from None
            self._drop_stale()
        else:
            if resume:
                self.say(f"nothing to resume for {self.final}: starting at the first block")
            self.folder.mkdir(parents=True)
            self.shards = ShardWriter(self.folder, max_shard_bytes)

    def _drop_stale(self) -> None:
        """Activations other than the recorded hidden states (a later set, the spill of the block that was
        running) go: they are not what --resume continues from."""
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

    def close_weights(self, total_blocks: int, extra: dict) -> Path:
        """Every block is written: record that (so a failure from here on is finished by --resume, not redone)
        and give the shards their names. Returns the partial folder, for the caller's metadata (config,
        tokenizer, manifest); ``publish`` then puts it in place."""
        self.shards.close()
        self._record(FINISHING, total_blocks, None, extra)
        shutil.rmtree(self.folder / "activations", ignore_errors=True)
        self.shards.finish()
        return self.folder

    def publish(self) -> Path:
        """Seal the complete folder, make it all durable, exchange the folders, and only then drop the progress
        record."""
        seal(self.folder)
        make_readable(self.folder)
        fsync_tree(self.folder)
        _exchange(self.folder, self.final, self.force)
        (self.final / PROGRESS_FILE).unlink()
        shutil.rmtree(self.old, ignore_errors=True)
        fsync_path(self.final.parent)
        self.progress = None
        self.lock.release()
        return self.final

    def abandon(self) -> None:
        """After an error or an interruption: keep exactly what --resume needs and say where and how much, or
        remove a folder that holds nothing resumable."""
        try:
            if self.progress is not None and (self.folder / PROGRESS_FILE).is_file():
                self._drop_stale()
                done = ("all blocks are written" if self.finishing else
                        f"{self.progress['next_block']} block(s) are written")
                # Always said (not progress chatter): it is where the work went. The command's closing line (the
                # error, or what stopped it) says it.
                interrupt.keep(f"{done} and kept in {self.folder} ({_size(_tree_bytes(self.folder))}): run the "
                               f"same command with --resume to {'finish' if self.finishing else 'continue'}")
            elif self.folder.exists():
                shutil.rmtree(self.folder, ignore_errors=True)
        finally:
            self.lock.release()
