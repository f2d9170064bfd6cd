"""What every model-changing command shares (quantize, prune): the settings for calibration, device,
output and module selection, and the common first steps: check the output, resolve and load the
model, cut the calibration windows."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.data import WindowRecord, calibration_windows, load_calibration_text, tokenize
from compress.errors import UserError
from compress.fsutil import refuse_existing
from compress.models import ResolvedModel, load_model, resolve
from compress.runtime import resolve_device
from compress.select import ModuleSelection


@dataclass
class RunSettings:
    model: str = "smollm2-135m"
    """Alias (see `compress models`) or a local model folder."""
    method: str = ""
    calib: str = "auto"
    """Calibration text: NAME[:SPLIT] (wikitext2, c4, sst2), a file, or auto."""
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    """Output folder; default out/<model>-<method>-<tag>."""
    force: bool = False
    trust_remote_code: bool = False
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    progress: bool = True

    @property
    def selection(self) -> ModuleSelection:
        return ModuleSelection(list(self.include), list(self.exclude))

    def output_folder(self, tag: str) -> Path:
        if self.out:
            return Path(self.out)
        stem = Path(self.model).name if Path(self.model).is_dir() else self.model
        return Path("out") / f"{stem}-{self.method}-{tag}"

    def say(self, message: str) -> None:
        if self.progress:
            print(message, file=sys.stderr)


@dataclass
class Loaded:
    """The model to change, and the calibration windows when the method observes data."""
    device: torch.device
    out: Path
    resolved: ResolvedModel
    model: object
    tokenizer: object
    windows: list[torch.Tensor] | None
    calibration: WindowRecord | None
    load_seconds: float


def load_for_run(settings: RunSettings, tag: str, needs_data: bool, check=None) -> Loaded:
    """Check everything the user could have got wrong, then load the model (float32 on CPU, float16 on
    CUDA: a private copy, the source is never touched) and, with ``needs_data``, the calibration windows.
    ``check(model)`` runs right after loading, before the slow part."""
    device = resolve_device(settings.device)
    out = settings.output_folder(tag)
    refuse_existing(out, settings.force)  # fail before the slow part, and again at the rename
    if settings.nsamples <= 0 or settings.seqlen <= 0:
        raise UserError(f"--nsamples ({settings.nsamples}) and --seqlen ({settings.seqlen}) must be positive")
    started = time.perf_counter()
    resolved = resolve(settings.model, settings.trust_remote_code)
    text, text_record = load_calibration_text(settings.calib) if needs_data else (None, None)
    model, tokenizer = load_model(resolved.path, torch.float32 if device.type == "cpu" else torch.float16,
                                  settings.trust_remote_code)
    if check is not None:
        check(model)
    load_seconds = time.perf_counter() - started
    windows, record = None, None
    if needs_data:
        seqlen = min(settings.seqlen, getattr(model.config, "max_position_embeddings", None) or settings.seqlen)
        windows, record = calibration_windows(tokenize(tokenizer, text), text_record, settings.nsamples, seqlen,
                                              settings.seed)
        settings.say(f"calibration: {record.count} x {seqlen} tokens from {text_record.source}:{text_record.split} "
                     f"({text_record.origin}), seed {settings.seed}")
    return Loaded(device, out, resolved, model, tokenizer, windows, record, load_seconds)
