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

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from compress.fingerprint import IN_FOLDER_NAMES, fingerprint
from compress.interrupt import keep
from compress.recipe.config import RecipeConfig, Stage
from compress.recipe.stages import STAGE_KINDS

FINGERPRINT_VERSION = "recipe-v1"


@dataclass
class PlannedStage:
    stage: Stage
    fingerprint: str
    output: Path


def base_identity(model: str) -> str:
    """What the first stage's input is: the base model's weight files, by content."""
    from compress.fingerprint import source_hash
    from compress.models import resolve

    return "sha256:" + source_hash(resolve(model).path)


def plan(recipe: RecipeConfig, stages: list[Stage], root: Path, base: str) -> list[PlannedStage]:
    """Each stage's fingerprint (its settings and its input's fingerprint, chained) and output path."""
    planned, previous = [], base
    for stage in stages:
        kind = STAGE_KINDS[stage.kind]
        fp = fingerprint({"version": FINGERPRINT_VERSION, "kind": stage.kind, "settings": stage.settings,
                          "device": recipe.device, "teacher": recipe.model if stage.kind == "distill" else None,
                          "input": previous}, IN_FOLDER_NAMES)
        output = root / "stages" / f"{stage.index + 1:02d}-{stage.name}-{fp}{kind.output_suffix(stage)}"
        planned.append(PlannedStage(stage, fp, output))
        previous = fp
    return planned


def base_is_language_model(recipe: RecipeConfig) -> bool:
    """Whether rows are compared with the base by KL and top-1 (a causal LM's next-token distributions); a
    classifier recipe is compared by task accuracy, row against row."""
    from transformers import AutoConfig

    from compress.models import is_causal_lm, resolve

    resolved = resolve(recipe.model)
    return is_causal_lm(AutoConfig.from_pretrained(resolved.path))


def bench_request(recipe: RecipeConfig, name: str, model: str, out: Path, compare: bool = True):
    from compress.bench.run import BenchRequest

    return BenchRequest(**recipe.bench, model=model, base=recipe.model if compare else None,
                        name=name, device=recipe.device, base_dtype=recipe.base_dtype, out=str(out),
                        progress=recipe.progress,
                        **({"dtype": recipe.base_dtype} if name == "base" and "dtype" not in recipe.bench else {}))


def _bench_fingerprint(recipe: RecipeConfig, identity: str) -> str:
    return fingerprint({"version": FINGERPRINT_VERSION, "row": identity, "bench": recipe.bench,
                        "base_dtype": recipe.base_dtype, "device": recipe.device}, IN_FOLDER_NAMES)


def kept_row(recipe: RecipeConfig, name: str, identity: str, root: Path) -> Path | None:
    """A row's result from an earlier run with the same stage and bench settings, or None (it is measured again)."""
    from compress.bench.result import kept_result

    path = kept_result(root / "results" / f"{name}.json", _bench_fingerprint(recipe, identity))
    if path is not None:
        _say(recipe, f"  reusing {path}")
    return path


def measure_row(recipe: RecipeConfig, name: str, model: str, identity: str, compare: bool) -> dict:
    """One row benchmarked in a child process (its peak memory its own), tagged; -> the result as a dict."""
    import tempfile

    from compress.bench.command import bench_in_child
    from compress.bench.result import SweepTag

    with tempfile.TemporaryDirectory(prefix="compress-row-") as tmp:
        result = bench_in_child(bench_request(recipe, name, model, Path(tmp) / f"{name}.json", compare))
    result.sweep = SweepTag(recipe.name, {"stage": name, "model": model}, _bench_fingerprint(recipe, identity))
    return result.to_dict()


def run_stage(stage: Stage, recipe: RecipeConfig, source: str, out: str, resume: bool) -> None:
    """One stage, here or on a Ray worker (which must see ``source`` and ``out``: a shared disk on a cluster)."""
    STAGE_KINDS[stage.kind].run(stage, recipe, source, Path(out), resume)


class _Here:
    """Runs the work in this process, one piece after another."""

    def stage(self, stage, recipe, source, out, resume):
        run_stage(stage, recipe, source, str(out), resume)

    def rows(self, recipe, rows, compare, on_done):
        for name, model, identity in rows:
            on_done(name, measure_row(recipe, name, model, identity, compare))


class _OnRay:
    """Each stage one Ray task (in order: each reads the one before), the bench rows Ray tasks gathered as they
    finish; every task declares what it needs (compress.executors.task_resources)."""

    def __init__(self, ray, recipe: RecipeConfig):
        from compress.executors import task_resources

        self.ray, self.retries = ray, recipe.ray_retries
        self.needs = task_resources(recipe, recipe.device)

    def stage(self, stage, recipe, source, out, resume):
        from compress.executors import ray_result

        ref = self.ray.remote(run_stage).options(**self.needs).remote(stage, recipe, source, str(out), resume)
        ray_result(self.ray, ref, stage.label, self.retries)

    def rows(self, recipe, rows, compare, on_done):
        from compress.executors import gather

        task = self.ray.remote(measure_row).options(**self.needs)
        pending = {task.remote(recipe, name, model, identity, compare): name for name, model, identity in rows}
        gather(self.ray, pending, lambda name: f"bench of {name}", self.retries, on_done)


@contextmanager
def _runner(recipe: RecipeConfig):
    if recipe.executor == "ray":
        from compress.executors import ray_session

        with ray_session(recipe.address, recipe.progress) as ray:
            yield _OnRay(ray, recipe)
    else:
        yield _Here()


def run_recipe(recipe: RecipeConfig, stages: list[Stage], resume: bool, command: list[str]) -> Path:
    from compress.bench.result import BenchResult
    from compress.bench.run import ensure_reference
    from compress.output import refuse_existing
    from compress.report import build_report
    from compress.runtime import resolve_device

    if recipe.executor == "local":
        resolve_device(recipe.device)  # on Ray the workers' devices count, not the driver's
    report = Path(recipe.report or Path("reports") / recipe.name)
    refuse_existing(report, force=True)  # the report replaces only an earlier report of ours: said before any work
    root = (Path(recipe.runs) / recipe.name).resolve()
    started = time.perf_counter()
    base = base_identity(recipe.model)
    planned = plan(recipe, stages, root, base)
    _say(recipe, f"recipe {recipe.name}: {len(planned)} stages on {recipe.model} ({recipe.device}, "
                 f"{recipe.executor} executor) -> {root}")
    source, done = recipe.model, 0
    paths: dict[str, Path] = {}
    rows = [("base", recipe.model, base)] * recipe.bench_base + [(p.stage.name, str(p.output), p.fingerprint)
                                                                 for p in planned if p.stage.bench]
    compare = base_is_language_model(recipe)
    try:
        with _runner(recipe) as runner:
            for number, item in enumerate(planned, 1):
                stage = item.stage
                if item.output.exists():
                    _say(recipe, f"[stage {number}/{len(planned)}] {stage.name} ({stage.kind}): reusing {item.output}")
                else:
                    _say(recipe, f"[stage {number}/{len(planned)}] {stage.name} ({stage.kind}) -> {item.output}  "
                                 f"(elapsed {(time.perf_counter() - started) / 60:.1f} min)")
                    item.output.parent.mkdir(parents=True, exist_ok=True)
                    runner.stage(stage, recipe, source, item.output, resume)
                source, done = str(item.output), number
            if compare:
                ensure_reference(bench_request(recipe, "base", recipe.model, Path("unused")))
            for name, _, identity in rows:
                kept = kept_row(recipe, name, identity, root)
                if kept is not None:
                    paths[name] = kept

            def finished(name: str, data: dict) -> None:
                paths[name] = BenchResult.from_dict(data).write(root / "results" / f"{name}.json")
                _say(recipe, f"[bench {len(paths)}/{len(rows)}] {name}  (elapsed "
                             f"{(time.perf_counter() - started) / 60:.1f} min)")

            runner.rows(recipe, [row for row in rows if row[0] not in paths], compare, finished)
    except KeyboardInterrupt:
        keep(f"{done} of {len(planned)} stages are finished in {root / 'stages'}: run the same command again "
             "(with --resume to continue a stage that was stopped half-way) to go on from there")
        raise
    notes = list(recipe.notes)
    notes.append("Stages: " + " -> ".join([f"{recipe.model} (base)"] + [f"{p.stage.name} ({p.stage.kind})"
                                                                        for p in planned])
                 + "." + ("" if recipe.bench_base else f" {recipe.model} itself is not a row (bench_base: false)."))
    for item in planned:
        notes += STAGE_KINDS[item.stage.kind].notes(item.stage, item.output)
    build_report([paths[name] for name, _, _ in rows], report, recipe.title or f"{recipe.model} recipe: {recipe.name}",
                 reproduce=[" ".join(command)], notes=notes, force=True)
    return report


def _say(recipe: RecipeConfig, message: str) -> None:
    if recipe.progress:
        print(message, file=sys.stderr, flush=True)
