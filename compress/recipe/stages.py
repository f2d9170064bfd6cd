"""The stage kinds of a recipe, a registry: each checks its settings up front (the keys of its own command's
YAML; the input, output and device are the recipe's) and runs its command's API on the previous stage's output.

A stage writes its output the way its command does (atomically, so an existing output is a finished one) and
resumes the way its command does (``resume``: a partial quantize or prune, a distillation's checkpoints)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

from compress.config_io import check_fields
from compress.errors import UserError
from compress.recipe.config import RecipeConfig, Stage


class StageKind:
    name: ClassVar[str]
    reserved: ClassVar[tuple[str, ...]] = ("model", "out", "force", "resume", "progress")
    """Keys the recipe sets: the input, the output and how the run is shown."""

    def check(self, stage: Stage, recipe: RecipeConfig, where: str) -> None:
        reserved = [k for k in stage.settings if k in self.reserved]
        if reserved:
            raise UserError(f"key '{reserved[0]}' in {where} is set by the recipe (each stage reads the previous "
                            "stage's output and writes its own): leave it out")
        self.check_settings(stage, recipe, where)

    def check_settings(self, stage: Stage, recipe: RecipeConfig, where: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def run(self, stage: Stage, recipe: RecipeConfig, source: str, out: Path, resume: bool) -> None:
        raise NotImplementedError  # pragma: no cover

    def notes(self, stage: Stage, out: Path) -> list[str]:
        """Lines for the report about what this stage did (a distillation's token budget and time)."""
        return []

    def output_suffix(self, stage: Stage) -> str:
        """The output's suffix: '' for a folder, '.gguf' for a file."""
        return ""


class RequestStage(StageKind):
    """A stage that is one command's request (PruneRequest, QuantizeRequest): its keys checked against the
    request, then the request's own checks of the method's options."""

    def request_cls(self) -> type:
        raise NotImplementedError  # pragma: no cover

    def check_request(self, request) -> None:
        """What the command checks before it loads anything."""
        request.method_config()

    def request(self, stage: Stage, recipe: RecipeConfig, source: str, where: str, out: Path | None = None,
                resume: bool = False):
        cls = self.request_cls()
        values = check_fields(cls, {"device": recipe.device, **stage.settings}, where)
        return cls(**values, model=source, out=str(out) if out else None, resume=resume, progress=recipe.progress)

    def check_settings(self, stage, recipe, where):
        request = self.request(stage, recipe, recipe.model, where)
        try:
            self.check_request(request)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None


class PruneStage(RequestStage):
    name = "prune"

    def request_cls(self):
        from compress.prune.request import PruneRequest

        return PruneRequest

    def check_request(self, request):
        request.method_config()
        request.quant_config()

    def run(self, stage, recipe, source, out, resume):
        from compress.prune.run import prune

        prune(self.request(stage, recipe, source, stage.label, out, resume))


class QuantizeStage(RequestStage):
    name = "quantize"

    def request_cls(self):
        from compress.quant.request import QuantizeRequest

        return QuantizeRequest

    def check_request(self, request):
        request.method_config()
        request.head_config()

    def run(self, stage, recipe, source, out, resume):
        from compress.api import quantize

        quantize(self.request(stage, recipe, source, stage.label, out, resume))


class FinetuneStage(StageKind):
    """Train a classifier head (and the encoder under it) on a labelled task: TinyBERT's task-specific teacher.
    Settings: ``num_labels`` and the keys of a distill config's ``finetune`` section (data, epochs, lr, ...)."""
    name = "finetune"
    reserved = ("model", "out", "progress")
    OWN_KEYS = ("num_labels", "seqlen", "seed")

    def config(self, stage: Stage, recipe: RecipeConfig, source: str, where: str):
        from distill.config import config_from_dict

        settings = dict(stage.settings)
        own = {k: settings.pop(k) for k in self.OWN_KEYS if k in settings}
        if own.get("num_labels") is None:
            raise UserError(f"{where} needs num_labels: the classes of the task its head is trained on")
        return config_from_dict({"teacher": source, "device": recipe.device, "progress": recipe.progress, **own,
                                 "finetune": settings}, where)

    def check_settings(self, stage, recipe, where):
        self.config(stage, recipe, recipe.model, where)

    def run(self, stage, recipe, source, out, resume):
        from distill.run import fine_tuned_teacher

        fine_tuned_teacher(self.config(stage, recipe, source, stage.label), out)


class DistillStage(StageKind):
    """``distill run``. After a ``finetune`` stage, that stage's output is the teacher and ``student:`` shapes the
    student (TinyBERT). Otherwise the recipe's base is the default teacher (Minitron distils from the original)
    and an earlier stage's output is the student (``student.from_model``)."""
    name = "distill"
    reserved = ("out", "progress")

    def config(self, stage: Stage, recipe: RecipeConfig, source: str | None, out: Path | None, where: str):
        """``source``: the previous stage's output (None for a first stage)."""
        from distill.config import config_from_dict

        values = {"teacher": recipe.model, "device": recipe.device, **stage.settings,
                  "progress": recipe.progress, "out": str(out) if out else None}
        student = values.get("student") or {}
        if isinstance(student, dict) and student.get("from_model") is not None:
            raise UserError(f"key 'student.from_model' in {where} is set by the recipe (the previous stage's "
                            "output): leave it out")
        if source is not None and stage.previous_kind == "finetune":
            if "teacher" in stage.settings:
                raise UserError(f"key 'teacher' in {where} is set by the recipe (the fine-tuned model of the stage "
                                "before): leave it out")
            values["teacher"] = source
        elif source is not None:
            values["student"] = {**(student if isinstance(student, dict) else {}), "from_model": source}
        return config_from_dict(values, where)

    def check_settings(self, stage, recipe, where):
        # The previous stage's output does not exist yet: its place is checked with a stand-in.
        self.config(stage, recipe, "the previous stage's output" if stage.previous_kind else None, None, where)

    def run(self, stage, recipe, source, out, resume):
        from distill.run import run

        run(self.config(stage, recipe, source if stage.previous_kind else None, out, stage.label), resume=resume)

    def notes(self, stage, out):
        from distill.run import MANIFEST

        if not (out / MANIFEST).is_file():
            return []
        manifest = json.loads((out / MANIFEST).read_text())
        config = manifest["config"]
        steps = [h for h in manifest["history"] if h.get("event") == "stage"]
        examples = sum(h["steps"] * config["stages"][h["stage"]]["batch_size"] for h in steps)
        # A language model trains on windows of seqlen tokens; a classifier on sentences (up to seqlen tokens).
        budget = (f"{examples * config['seqlen']:,} training tokens" if manifest["kind"] == "lm" else
                  f"{examples:,} training sentences")
        seconds = sum(h["seconds"] for h in steps)
        parts = ", then ".join(f"{h['steps']} steps of its {h['kind']} stage" for h in steps)
        figures = manifest.get("figures") or {}
        metric = (manifest.get("eval") or {}).get("metric", "score")
        before_after = (f" Its own evaluation: {metric} {figures['student_before']:.2f} before, "
                        f"{figures['student_after']:.2f} after (teacher {figures['teacher']:.2f})."
                        if {"student_before", "student_after", "teacher"} <= set(figures) else "")
        teacher = ("the model of the finetune stage before it" if stage.previous_kind == "finetune"
                   else manifest["teacher"]["reference"])
        return [f"{stage.name}: distilled from {teacher} on {config['data']}, "
                f"{budget} ({parts}), {seconds / 60:.1f} min of training on {manifest['device']}."
                f"{before_after}"]


@dataclasses.dataclass
class _GgufExport:
    type: str = "q4_0"
    keep_float: bool = False


class ExportStage(StageKind):
    """``export: {format: onnx, ...OnnxExportRequest keys}`` or ``{format: gguf, type: q4_0, keep_float: ...}``."""
    name = "export"
    reserved = ("model", "out", "force")
    FORMATS = ("onnx", "gguf")

    def _format(self, stage: Stage, where: str) -> tuple[str, dict]:
        settings = dict(stage.settings)
        fmt = settings.pop("format", None)
        if fmt not in self.FORMATS:
            raise UserError(f"{where} needs 'format: onnx' or 'format: gguf', not {fmt!r}")
        return fmt, settings

    def check_settings(self, stage, recipe, where):
        from compress.ort.build import OnnxExportRequest

        fmt, settings = self._format(stage, where)
        check_fields(OnnxExportRequest if fmt == "onnx" else _GgufExport, settings, where)

    def output_suffix(self, stage: Stage) -> str:
        return ".gguf" if stage.settings.get("format") == "gguf" else ""

    def run(self, stage, recipe, source, out, resume):
        fmt, settings = self._format(stage, stage.label)
        if fmt == "onnx":
            from compress.ort.build import OnnxExportRequest, export_onnx

            export_onnx(OnnxExportRequest(model=source, out=str(out), **settings))
        else:
            from compress.export_gguf.run import export_gguf

            gguf = _GgufExport(**settings)
            export_gguf(source, gguf.type, str(out), keep_float=gguf.keep_float)


STAGE_KINDS: dict[str, StageKind] = {kind.name: kind for kind in (FinetuneStage(), PruneStage(), DistillStage(),
                                                                   QuantizeStage(), ExportStage())}
