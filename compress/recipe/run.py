"""`compress recipe run RECIPE.yaml [--resume]`: the stages in order, each on the previous stage's output, then
the base and every stage benchmarked on the same windows, and one report.

Every stage's output is kept under ``<runs>/<name>/stages/`` and named by its fingerprint: a hash of the stage's
kind and settings and of its input's fingerprint (the first stage's input is the base model's weights, by their
SHA-256). A change to a stage therefore changes its fingerprint and every later one's, and only those stages run
again; a finished output (written atomically by its command) is reused as it is. A stage stopped half-way
continues with ``--resume``, the way its own command resumes (a partial quantize or prune, a distillation's
checkpoints). Bench results are reused the same way, by the fingerprint of the stage and the bench settings.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from compress.errors import UserError
from compress.interrupt import keep
from compress.recipe.config import RecipeConfig, Stage
from compress.recipe.stages import STAGE_KINDS

FINGERPRINT_VERSION = "recipe-v1"


@dataclass
class PlannedStage:
    stage: Stage
    fingerprint: str
    output: Path


def fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def base_identity(model: str) -> str:
    """What the first stage's input is: the base model's weight files, by content."""
    from compress.api import source_hash
    from compress.models import resolve

    return "sha256:" + source_hash(resolve(model).path)


def plan(recipe: RecipeConfig, stages: list[Stage], root: Path, base: str) -> list[PlannedStage]:
    """Each stage's fingerprint (its settings and its input's fingerprint, chained) and output path."""
    planned, previous = [], base
    for stage in stages:
        kind = STAGE_KINDS[stage.kind]
        fp = fingerprint({"version": FINGERPRINT_VERSION, "kind": stage.kind, "settings": stage.settings,
                          "device": recipe.device, "teacher": recipe.model if stage.kind == "distill" else None,
                          "input": previous})
        output = root / "stages" / f"{stage.index + 1:02d}-{stage.name}-{fp}{kind.output_suffix(stage)}"
        planned.append(PlannedStage(stage, fp, output))
        previous = fp
    return planned


def bench_request(recipe: RecipeConfig, name: str, model: str, out: Path):
    from compress.bench.run import BenchRequest

    return BenchRequest(**{"speed": True, **recipe.bench}, model=model, base=recipe.model, name=name,
                        device=recipe.device, base_dtype=recipe.base_dtype, out=str(out), progress=recipe.progress,
                        **({"dtype": recipe.base_dtype} if name == "base" and "dtype" not in recipe.bench else {}))


def bench_row(recipe: RecipeConfig, name: str, model: str, identity: str, root: Path) -> Path:
    """The bench result of one row, measured in a child process unless a result with the same fingerprint exists."""
    from compress.bench.command import bench_in_child
    from compress.bench.result import BenchResult, SweepTag

    path = root / "results" / f"{name}.json"
    fp = fingerprint({"version": FINGERPRINT_VERSION, "row": identity, "bench": recipe.bench,
                      "base_dtype": recipe.base_dtype, "device": recipe.device})
    if path.is_file():
        try:
            kept = BenchResult.read(path)
            if kept.sweep is not None and kept.sweep.fingerprint == fp:
                _say(recipe, f"  reusing {path}")
                return path
        except UserError:  # damaged or foreign: measured again
            pass
        path.unlink()
    result = bench_in_child(bench_request(recipe, name, model, path))
    result.sweep = SweepTag(recipe.name, {"stage": name, "model": model}, fp)
    result.write(path)
    return path


def run_recipe(recipe: RecipeConfig, stages: list[Stage], resume: bool, command: list[str]) -> Path:
    from compress.bench.run import ensure_reference
    from compress.report import build_report
    from compress.runtime import resolve_device

    resolve_device(recipe.device)
    root = Path(recipe.runs) / recipe.name
    started = time.perf_counter()
    base = base_identity(recipe.model)
    planned = plan(recipe, stages, root, base)
    _say(recipe, f"recipe {recipe.name}: {len(planned)} stages on {recipe.model} ({recipe.device}) -> {root}")
    source, done = recipe.model, 0
    try:
        for number, item in enumerate(planned, 1):
            stage = item.stage
            if item.output.exists():
                _say(recipe, f"[stage {number}/{len(planned)}] {stage.name} ({stage.kind}): reusing {item.output}")
            else:
                _say(recipe, f"[stage {number}/{len(planned)}] {stage.name} ({stage.kind}) -> {item.output}  "
                             f"(elapsed {(time.perf_counter() - started) / 60:.1f} min)")
                item.output.parent.mkdir(parents=True, exist_ok=True)
                STAGE_KINDS[stage.kind].run(stage, recipe, source, item.output, resume)
            source, done = str(item.output), number
        ensure_reference(bench_request(recipe, "base", recipe.model, Path("unused")))
        rows = [("base", recipe.model, base)] + [(p.stage.name, str(p.output), p.fingerprint) for p in planned
                                                 if p.stage.bench]
        paths = []
        for number, (name, model, identity) in enumerate(rows, 1):
            _say(recipe, f"[bench {number}/{len(rows)}] {name}  (elapsed {(time.perf_counter() - started) / 60:.1f} "
                         "min)")
            paths.append(bench_row(recipe, name, model, identity, root))
    except KeyboardInterrupt:
        keep(f"{done} of {len(planned)} stages are finished in {root / 'stages'}: run the same command again "
             "(with --resume to continue a stage that was stopped half-way) to go on from there")
        raise
    notes = list(recipe.notes)
    notes.append("Stages: " + " -> ".join(["base"] + [f"{p.stage.name} ({p.stage.kind})" for p in planned]) + ".")
    for item in planned:
        notes += STAGE_KINDS[item.stage.kind].notes(item.stage, item.output)
    report = Path(recipe.report or Path("reports") / recipe.name)
    build_report(paths, report, recipe.title or f"{recipe.model} recipe: {recipe.name}",
                 reproduce=[" ".join(command)], notes=notes, force=True)
    return report


def _say(recipe: RecipeConfig, message: str) -> None:
    if recipe.progress:
        print(message, file=sys.stderr, flush=True)
