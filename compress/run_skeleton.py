"""The run skeleton every block-by-block command shares (quantize, prune; their settings are
compress.settings): check the output, open the model (streaming by default: a meta skeleton whose blocks are
read one at a time), cut the calibration windows, and write the result into a resumable partial folder that is
renamed into place when complete (``run_output``)."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from compress.blocks import BlockSource
from compress.driver import DriverPlan, DriverReport
from compress.checkpoint import MANIFEST_NAME
from compress.data import WindowRecord, calibration_windows_of_text, load_calibration_text
from compress.errors import UserError
from compress.lazy import LazyModel
from compress.models import ResolvedModel, refuse_quantized_source, resolve
from compress.shards import ShardReader
from compress.fingerprint import fingerprint
from compress.output import (PROGRESS_FILE, BlockCheckpoints, ModelOutput, refuse_existing, refuse_output_of_source,
                             refuse_source_overlap, source_identity)
from compress.runtime import resolve_device
from compress.settings import RunSettings
from compress.writer import CheckpointWriter


@dataclass
class Loaded:
    """The model to change (its blocks come from ``source``) and the calibration windows."""
    device: torch.device
    out: Path
    resolved: ResolvedModel
    lazy: LazyModel
    source: BlockSource
    tokenizer: object
    windows: list[torch.Tensor] | None
    calibration: WindowRecord | None
    load_seconds: float

    @property
    def model(self):
        return self.lazy.model


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype blocks are observed and changed in: float32 on every device. Calibrating in half
    precision on CUDA rounded the activations the Hessians are made of and the weights being updated,
    and gave a worse W3 model than the CPU (SmolLM2 perplexity 199.7 against 151.9); the work holds one
    block at a time, which fits any GPU in float32."""
    return torch.float32


@dataclass
class Opened:
    """The model opened for a run, nothing read yet (a meta skeleton): what a command checks before the slow
    part, then ``load``s."""
    settings: RunSettings
    device: torch.device
    out: Path
    resolved: ResolvedModel
    lazy: LazyModel
    streaming: bool
    text: object
    text_record: object
    started: float

    @property
    def model(self):
        return self.lazy.model

    def load(self) -> Loaded:
        """Read the model (streaming: only the skeleton; ``settings.in_memory``, or a method that needs the whole
        model: every tensor), its tokenizer, and with calibration text, cut the windows."""
        from transformers import AutoTokenizer

        settings, lazy = self.settings, self.lazy
        if not self.streaming:
            lazy.materialize_all("cpu")
        tokenizer = AutoTokenizer.from_pretrained(self.resolved.path, trust_remote_code=settings.trust_remote_code)
        load_seconds = time.perf_counter() - self.started
        windows, record = None, None
        if self.text is not None:
            config = lazy.model.config
            seqlen = min(settings.seqlen, getattr(config, "max_position_embeddings", None) or settings.seqlen)
            windows, record = calibration_windows_of_text(tokenizer, self.text, self.text_record, settings.nsamples,
                                                          seqlen, settings.seed)
            settings.say(f"calibration: {record.count} x {seqlen} tokens{' (BOS first)' if record.bos else ''} from "
                         f"{self.text_record.source}:"
                         f"{self.text_record.split} ({self.text_record.origin}), seed {settings.seed}")
        source = BlockSource(lazy.model, lazy, streaming=self.streaming)
        return Loaded(self.device, self.out, self.resolved, lazy, source, tokenizer, windows, record, load_seconds)


def open_for_run(settings: RunSettings, tag: "str | Callable[[torch.nn.Module], str]", needs_data: bool,
                 streaming: bool = True) -> Opened:
    """Check everything the user could have got wrong, then open the model as a meta skeleton (a private copy:
    the source is never touched) and, with ``needs_data``, read the calibration text. ``streaming`` False is for
    methods that need the whole model. ``tag`` names the default output folder; a callable makes it from the
    skeleton (settings that depend on the model's widths), after checks of its own on it."""
    device = resolve_device(settings.device)
    # Named before the model is opened unless the tag comes from its skeleton and no --out names the folder.
    out = settings.output_folder(tag) if isinstance(tag, str) or settings.out else None
    if out is not None:
        refuse_output_of_source(out, settings.model)
        refuse_existing(out, settings.force)  # fail before the slow part, and again at the rename
    if settings.nsamples <= 0 or settings.seqlen <= 0:
        raise UserError(f"--nsamples ({settings.nsamples}) and --seqlen ({settings.seqlen}) must be positive")
    streaming = streaming and not settings.in_memory
    if settings.resume and not streaming:
        raise UserError("--resume continues a streaming run: leave out --in-memory")
    started = time.perf_counter()
    resolved = resolve(settings.model, settings.trust_remote_code)
    if out is not None:
        refuse_source_overlap(out, resolved.path)
    text, text_record = load_calibration_text(settings.calib) if needs_data else (None, None)
    reader = ShardReader(resolved.path)
    refuse_quantized_source(settings.model, reader)
    lazy = LazyModel(resolved.path, compute_dtype(device), settings.trust_remote_code, reader=reader)
    if not isinstance(tag, str):
        tag = tag(lazy.model)  # its checks on the skeleton run whether or not --out named the folder
        if out is None:
            out = settings.output_folder(tag)
            refuse_output_of_source(out, settings.model)
            refuse_existing(out, settings.force)
            refuse_source_overlap(out, resolved.path)
    return Opened(settings, device, out, resolved, lazy, streaming, text, text_record, started)


class RunOutput:
    """The output of a layer-by-layer run while it is written: the resumable folder (compress.output), the method's
    resumable record (``record``: of ``record_kind``, read back from an interrupted run or fresh), the weight
    writer, the driver plan that continues an interrupted run, and the driver's report."""

    def __init__(self, settings: RunSettings, run: Loaded, packed: bool, record_kind) -> None:
        self.settings, self.run = settings, run
        calibration = run.calibration.text if run.calibration else None
        identity = {"settings": settings.result_settings(), "source": source_identity(run.resolved.path),
                    "device": run.device.type,
                    # The text itself, not its name: an edited file, or a hub that became reachable, is
                    # another calibration set, and mixing two in one output would go unnoticed.
                    "calibration": [calibration.origin, calibration.sha256] if calibration else None}
        self.partial = ModelOutput(run.out, fingerprint(identity), resume=settings.resume, force=settings.force,
                                   max_shard_bytes=settings.max_shard_bytes,
                                   checkpoint_every_s=settings.checkpoint_every, source=run.resolved.path,
                                   say=settings.say)
        try:  # a damaged record is said before anything runs, and the kept partial folder is left as it is
            self.record = record_kind.from_dict(self.partial.saved, str(self.partial.folder / PROGRESS_FILE))
        except BaseException:
            self.partial.lock.release()
            raise
        self.resumed_at = self.partial.next_block
        if settings.resume and self.partial.finishing:
            settings.say(f"every block of {run.out} is written: finishing it from {self.partial.folder}")
        elif settings.resume and self.resumed_at:
            settings.say(f"resuming at block {self.resumed_at} of {len(run.source.blocks)} "
                         f"from {self.partial.folder}")
        self.writer = CheckpointWriter(run.lazy, self.partial.shards, run.source.prefix, packed)
        self.report = DriverReport()
        """What the driver measures in this run (blocks' seconds and RSS, experts)."""

    @property
    def resumed(self) -> bool:
        return self.resumed_at > 0

    def driver_plan(self) -> DriverPlan:
        """The driver's start and checkpoint hook: ``record`` is written beside the weights at each checkpoint."""
        return DriverPlan(
            start=self.partial.next_block, saved_hidden=self.partial.saved_hidden,
            spill_folder=self.partial.spill_folder, activation_budget=self.settings.activation_budget,
            expert_min_fraction=self.settings.expert_min_share,
            block_done=BlockCheckpoints(self.partial, len(self.run.source.blocks), self.record))

    def experts_record(self, report: DriverReport, rule: str) -> dict | None:
        """The manifest's record of how every expert was calibrated (None without experts), said aloud
        when the data-free rule applied to any (a resumed run says it for the blocks it did itself)."""
        if not report.experts:
            return None
        starved = [name for name, e in report.experts.items() if e["data_free"]]
        record = {"min_tokens": report.expert_min_tokens, "min_share": self.settings.expert_min_share,
                  "rule": f"fewer tokens than min_tokens: {rule}", "layers": report.experts}
        message = (f"experts: {len(report.experts) - len(starved)} of {len(report.experts)} expert layers calibrated "
                   f"(each reached by at least {report.expert_min_tokens} calibration tokens)")
        if starved:
            message += (f"; {len(starved)} reached by fewer were handled data-free ({rule}): "
                        f"{', '.join(starved[:4])}{', ...' if len(starved) > 4 else ''}")
            print(message, file=sys.stderr)
        else:
            self.settings.say(message)
        return record

    def finish(self, quantization_config: dict | None, manifest: dict, config_changes: dict | None = None) -> Path:
        """Close the weights, write config (with ``config_changes`` set on it), tokenizer and manifest, and exchange
        the folder into place."""
        manifest["streaming"] = self.run.source.streaming
        manifest["resumed_at_block"] = self.resumed_at or None
        folder = self.partial.close_weights(len(self.run.source.blocks), self.record.to_dict())
        self._write_metadata(folder, quantization_config, manifest, config_changes or {})
        return self.partial.publish()

    def _write_metadata(self, folder: Path, quantization_config: dict | None, manifest: dict,
                        config_changes: dict) -> None:
        lazy = self.run.lazy
        config = copy.deepcopy(lazy.model.config)
        source_config = json.loads((lazy.path / "config.json").read_text())
        stored = source_config.get("dtype") or source_config.get("torch_dtype")
        if stored:
            config.dtype = stored
        if quantization_config is not None:
            config.quantization_config = quantization_config
        for key, value in config_changes.items():
            setattr(config, key, value)
        config.save_pretrained(folder)
        if (lazy.path / "generation_config.json").is_file():
            shutil.copyfile(lazy.path / "generation_config.json", folder / "generation_config.json")
        if self.run.tokenizer is not None:
            self.run.tokenizer.save_pretrained(folder)
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")

    def abandon(self) -> None:
        self.partial.abandon()


@contextmanager
def run_output(settings: RunSettings, run: Loaded, packed: bool, record_kind) -> Iterator[RunOutput]:
    """The output of every block-by-block command (quantize, prune): begin it; the command drives the blocks and
    calls ``finish``; on any error or interruption it is abandoned, which keeps every resumable byte."""
    output = RunOutput(settings, run, packed, record_kind)
    try:
        yield output
    except BaseException:
        output.abandon()
        raise
