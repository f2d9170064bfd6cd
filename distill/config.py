"""DistillConfig: everything a distillation run needs, read from YAML that mirrors these dataclasses.

Unknown keys, wrong types and impossible values are user errors with a one-line message.
``--set a.b=value`` overrides use dotted paths into the same structure (list items by index).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from compress.config_io import check_fields, read_yaml_mapping
from compress.errors import UserError
from distill.augment import AugmentConfig
from distill.losses import LOSSES

STAGE_KINDS = {
    # kind -> losses it trains by default
    "intermediate": ["embedding", "hidden", "attention"],
    "prediction": ["prediction"],
}


@dataclass
class StudentConfig:
    layers: int | None = None
    """Transformer layers of the student (default: half the teacher's, rounded down)."""
    hidden_size: int | None = None
    """Width of the residual stream (default: the teacher's). A narrower student gets learned projections."""
    intermediate_size: int | None = None
    """MLP width (default: the teacher's). A narrower MLP keeps the teacher's most important channels."""
    attention_heads: int | None = None
    """Attention heads (default: the teacher's; the attention loss needs equal head counts)."""
    init: str = "teacher"
    """'teacher': copy the mapped teacher layers where shapes allow; 'random': from scratch."""
    from_model: str | None = None
    """A model folder to start from as it is instead, e.g. the output of `compress prune --method
    structured`: its shape comes from its config, and when it was made by removing layers its layer
    map comes from its manifest (each block distils the teacher block it was)."""


@dataclass
class Schedule:
    """How long and how fast one training loop runs (AdamW, linear warm-up then linear decay)."""
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 5e-5
    batch_size: int = 32
    warmup: float = 0.1
    """Fraction of the steps spent warming the learning rate up."""
    weight_decay: float = 0.01


@dataclass
class FinetuneConfig(Schedule):
    """Fine-tune the teacher on the labelled task first (TinyBERT's teacher is task-specific)."""
    data: str = "sst2:train"
    max_examples: int | None = None


@dataclass
class StageConfig(Schedule):
    kind: str = "intermediate"
    """'intermediate' (embedding, hidden-state and attention losses) or 'prediction' (soft targets)."""
    data: str | None = None
    """Training text or task (default: the run's ``data``)."""
    losses: list[str] | None = None
    """Losses this stage trains (default: those of its kind); weights come from the run's ``losses``."""


@dataclass
class DistillConfig:
    teacher: str = "minilm-l6"
    """Alias or folder of the teacher."""
    num_labels: int | None = None
    """For a bare encoder teacher: give it a classifier head with this many labels (trained by ``finetune``)."""
    finetune: FinetuneConfig | None = None
    student: StudentConfig = field(default_factory=StudentConfig)
    layer_map: str | list[int] = "uniform"
    """'uniform' (g(m) = m * N / M) or the teacher layer (1..N) for each student layer (1..M)."""
    losses: dict = field(default_factory=lambda: {"embedding": 1.0, "hidden": 1.0, "attention": 1.0,
                                                  "prediction": 1.0})
    """Weight of each loss; a loss with weight 0 is not computed."""
    temperature: float = 1.0
    hidden_normalize: bool = False
    """Compare RMS-normalised hidden states (for pre-norm decoders with outsized residual activations);
    off = TinyBERT's plain MSE."""
    hard_label_weight: float = 0.0
    """Prediction stage on labelled data: add this weight of cross-entropy with the true labels."""
    data: str = "sst2:train"
    """Default training data: a labelled task split (classifiers) or a text source (language models)."""
    max_examples: int | None = None
    """Use at most this many training examples (sentences or windows), chosen with ``seed``."""
    augment: AugmentConfig | None = None
    seqlen: int = 128
    """Classifiers: max tokens per sentence. Language models: tokens per training window."""
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig(kind="intermediate"),
                                                               StageConfig(kind="prediction")])
    eval: str | None = None
    """Classifiers: a labelled split (default sst2:dev). Language models: a text (default wikitext2)."""
    eval_windows: int | None = 40
    eval_seqlen: int = 512
    eval_every: int = 0
    """Evaluate every this many steps (0: at the end of each stage)."""
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "auto"
    teacher_dtype: str = "float32"
    """float32 or bfloat16: the teacher only runs forward, so a lower precision saves time."""
    out: str | None = None
    progress: bool = True
    trust_remote_code: bool = False


_NESTED = {"student": StudentConfig, "finetune": FinetuneConfig, "augment": AugmentConfig}
TEACHER_DTYPES = ("float32", "bfloat16")


def _build(cls, values: dict, origin: str):
    if not isinstance(values, dict):
        raise UserError(f"{origin} must be a mapping of settings, not {values!r}")
    check_fields(cls, values, origin)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{origin} is missing required key(s) {', '.join(missing)}")
    return cls(**values)


def config_from_dict(values: dict, origin: str = "the config") -> DistillConfig:
    values = dict(values)
    for key, cls in _NESTED.items():
        if values.get(key) is not None:
            values[key] = _build(cls, values[key], f"{origin} section '{key}'")
    if "stages" in values:
        stages = values["stages"]
        if not isinstance(stages, list) or not stages:
            raise UserError(f"'stages' in {origin} must be a non-empty list of stages")
        values["stages"] = [_build(StageConfig, s, f"{origin} stage {i}") for i, s in enumerate(stages)]
    config = _build(DistillConfig, values, origin)
    validate(config, origin)
    return config


def load_config(path: Path, overrides: list[str] = ()) -> DistillConfig:
    values = read_yaml_mapping(path)
    for item in overrides:
        apply_override(values, item)
    return config_from_dict(values, str(path))


def apply_override(values: dict, item: str) -> None:
    """``a.b.0.c=value`` (value parsed as YAML) into the nested mapping ``values``."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"--set {item!r} must look like key=value (e.g. --set student.layers=2)")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node = values
    for depth, part in enumerate(parts[:-1]):
        if part == "stages" and "stages" not in node:
            node["stages"] = [dataclasses.asdict(s) for s in DistillConfig().stages]
        child = _child(node, part, key)
        if child is None:
            child = {}
            _assign(node, part, child, key)
        node = child
    _assign(node, parts[-1], value, key)


def _child(node, part: str, key: str):
    if isinstance(node, list):
        return node[_index(node, part, key)]
    return node.get(part)


def _assign(node, part: str, value, key: str) -> None:
    if isinstance(node, list):
        node[_index(node, part, key)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise UserError(f"--set {key}: '{part}' is inside a value that is not a section")


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(f"--set {key}: '{part}' is not an index of a list of {len(node)} items")
    return int(part)


def validate(config: DistillConfig, origin: str) -> None:
    """Values that have the right type but cannot work."""
    for name, weight in config.losses.items():
        if name not in LOSSES:
            raise UserError(f"unknown loss '{name}' in {origin}: valid losses are {', '.join(LOSSES)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise UserError(f"loss weight '{name}' in {origin} must be a number >= 0, not {weight!r}")
    if isinstance(config.layer_map, str) and config.layer_map != "uniform":
        raise UserError(f"layer_map in {origin} must be 'uniform' or a list of teacher layers, not {config.layer_map!r}")
    if config.temperature <= 0:
        raise UserError(f"temperature in {origin} must be positive, not {config.temperature}")
    if config.seqlen <= 0 or config.eval_seqlen <= 0:
        raise UserError(f"seqlen and eval_seqlen in {origin} must be positive")
    if config.teacher_dtype not in TEACHER_DTYPES:
        raise UserError(f"teacher_dtype in {origin} must be one of {', '.join(TEACHER_DTYPES)}, "
                        f"not {config.teacher_dtype!r}")
    if config.student.init not in ("teacher", "random"):
        raise UserError(f"student.init in {origin} must be 'teacher' or 'random', not {config.student.init!r}")
    if config.student.from_model is not None:
        shaped = [k for k in ("layers", "hidden_size", "intermediate_size", "attention_heads")
                  if getattr(config.student, k) is not None] + (["init"] if config.student.init != "teacher" else [])
        if shaped:
            raise UserError(f"student.from_model in {origin} takes the student's shape and weights from that model: "
                            f"leave student.{shaped[0]} out")
    for key in ("layers", "hidden_size", "intermediate_size", "attention_heads"):
        value = getattr(config.student, key)
        if value is not None and value <= 0:
            raise UserError(f"student.{key} in {origin} must be positive, not {value}")
    if config.max_examples is not None and config.max_examples <= 0:
        raise UserError(f"max_examples in {origin} must be positive")
    for i, stage in enumerate(config.stages):
        if stage.kind not in STAGE_KINDS:
            raise UserError(f"stage {i} in {origin} has kind {stage.kind!r}: use one of {', '.join(STAGE_KINDS)}")
        for name in stage.losses or []:
            if name not in LOSSES:
                raise UserError(f"unknown loss '{name}' in {origin} stage {i}: valid losses are {', '.join(LOSSES)}")
        _check_schedule(stage, f"stage {i} in {origin}")
    if config.finetune is not None:
        _check_schedule(config.finetune, f"section 'finetune' in {origin}")


def _check_schedule(schedule: Schedule, where: str) -> None:
    if schedule.epochs <= 0 or schedule.lr <= 0 or schedule.batch_size <= 0:
        raise UserError(f"{where} needs positive epochs, lr and batch_size")
    if schedule.max_steps is not None and schedule.max_steps <= 0:
        raise UserError(f"{where}: max_steps must be positive")
    if not 0 <= schedule.warmup < 1:
        raise UserError(f"{where}: warmup is a fraction of the steps in [0, 1)")


def stage_losses(config: DistillConfig, stage: StageConfig) -> dict[str, float]:
    """The losses a stage trains with their weights; zero-weight losses are dropped."""
    names = stage.losses if stage.losses is not None else STAGE_KINDS[stage.kind]
    return {name: float(config.losses.get(name, 1.0)) for name in names if config.losses.get(name, 1.0) > 0}


def to_dict(config: DistillConfig) -> dict:
    return copy.deepcopy(dataclasses.asdict(config))
