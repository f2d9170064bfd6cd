"""A recipe file: the base model, how every stage is benchmarked, and the list of stages.

    name: minitron-smollm2          # default: the file's stem; runs/<name>/ and reports/<name>/
    model: smollm2-135m             # the base: the first stage's input, the teacher and the bench's --base
    device: cpu
    bench: {seqlen: 512, windows: 40}   # `compress bench` settings shared by the base and every stage
    stages:
      - prune: {method: structured, target: mlp, sparsity: 0.25}
      - distill: {stages: [{kind: prediction, max_steps: 200}]}
      - quantize: {method: gptq, bits: 4}

Each stage is one mapping with exactly one kind key (prune, distill, quantize, export), whose settings are the keys
of that command's own YAML; ``name`` (default: the kind) labels it and ``bench: false`` leaves it out of the
report. Every stage is checked here, before any work, with one-line errors naming the stage and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compress.config_io import check_fields, read_yaml_mapping
from compress.errors import UserError
from compress.executors import BatchSettings

STAGE_KEYS = ("name", "bench")
"""Keys a stage may hold beside its kind."""
BENCH_RESERVED = ("model", "base", "name", "out", "device", "progress")
"""Bench settings the recipe sets itself."""


@dataclass
class Stage:
    kind: str
    settings: dict
    """The kind's own YAML keys, as written."""
    name: str
    bench: bool = True
    index: int = 0
    previous_kind: str | None = None
    """The kind of the stage before (None for the first): a distillation after a fine-tune distils from it."""

    @property
    def label(self) -> str:
        return f"stage {self.index + 1} ({self.name})"


@dataclass
class RecipeConfig(BatchSettings):
    bench: dict = field(default_factory=dict)
    """`compress bench` settings (seqlen, windows, tasks, limit, decode_batches, repeats, ...)."""
    base_dtype: str = "float32"
    """dtype the base row is measured in, and the reference every stage's KL is taken against."""
    bench_base: bool = True
    """Measure the base model as a row. Turn off where it cannot be measured on the task (a bare encoder before
    its fine-tune stage): the largest dense row is then the report's base."""
    stages: list = field(default_factory=list)

    def parsed_stages(self, origin: str) -> list[Stage]:
        from compress.recipe.stages import STAGE_KINDS

        if not isinstance(self.stages, list) or not self.stages:
            raise UserError(f"'stages' in {origin} must be a non-empty list of stages (prune, distill, quantize, "
                            "export)")
        parsed = []
        for index, entry in enumerate(self.stages):
            where = f"{origin} stage {index + 1}"
            if not isinstance(entry, dict):
                raise UserError(f"{where} must be a mapping such as {{quantize: {{bits: 4}}}}, not {entry!r}")
            kinds = [k for k in entry if k not in STAGE_KEYS]
            unknown = [k for k in kinds if k not in STAGE_KINDS]
            if unknown:
                raise UserError(f"unknown key '{unknown[0]}' in {where}: a stage is one of {', '.join(STAGE_KINDS)}, "
                                f"with optional {', '.join(STAGE_KEYS)}")
            if len(kinds) != 1:
                raise UserError(f"{where} must name exactly one kind ({', '.join(STAGE_KINDS)}), not "
                                f"{len(kinds)}: make one stage per step")
            kind = kinds[0]
            settings = entry[kind] if entry[kind] is not None else {}
            if not isinstance(settings, dict):
                raise UserError(f"'{kind}' in {where} must be a mapping of its settings, not {settings!r}")
            name = entry.get("name", kind)
            if not isinstance(name, str) or not name or "/" in name:
                raise UserError(f"'name' in {where} must be a short label without '/', not {name!r}")
            bench = entry.get("bench", True)
            if not isinstance(bench, bool):
                raise UserError(f"'bench' in {where} must be true or false, not {bench!r}")
            parsed.append(Stage(kind, dict(settings), name, bench, index, parsed[-1].kind if parsed else None))
        names = [s.name for s in parsed]
        repeated = next((n for n in names if names.count(n) > 1), None)
        if repeated:
            raise UserError(f"two stages in {origin} are named '{repeated}': give each a distinct 'name'")
        if "base" in names:
            raise UserError(f"a stage in {origin} is named 'base', the base model's row: choose another name")
        return parsed


def load_recipe(path: Path, overrides: dict | None = None) -> tuple[RecipeConfig, list[Stage]]:
    """The recipe and its stages, every stage's settings checked (nothing runs yet)."""
    from compress.models import check_reference
    from compress.recipe.stages import STAGE_KINDS

    origin = str(path)
    values = check_fields(RecipeConfig, read_yaml_mapping(path), origin)
    cfg = RecipeConfig(**(values | (overrides or {})))
    check_reference(cfg.model)
    from compress.executors import make_executor

    make_executor(cfg.executor, cfg.address)  # a bad executor or address, before any work
    cfg.name = cfg.name or path.stem
    check_bench_settings(cfg.bench, origin)
    stages = cfg.parsed_stages(origin)
    for stage in stages:
        STAGE_KINDS[stage.kind].check(stage, cfg, f"{origin} {stage.label}")
    return cfg, stages


def check_bench_settings(values: dict, origin: str) -> None:
    from compress.bench.run import BenchRequest

    where = f"section 'bench' of {origin}"
    if not isinstance(values, dict):
        raise UserError(f"{where} must be a mapping of `compress bench` settings, not {values!r}")
    reserved = [k for k in values if k in BENCH_RESERVED]
    if reserved:
        raise UserError(f"key '{reserved[0]}' in {where} is set by the recipe for each row: leave it out")
    check_fields(BenchRequest, values, where)
