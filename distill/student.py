"""Build the student from the teacher's config: fewer layers and/or narrower widths, same architecture,
initialised from the mapped teacher layers where shapes allow.

Weights are matched by name: student block m-1 takes teacher block g(m)-1; everything outside the
block stack (embeddings, final norm, heads) keeps its name. A tensor that differs from the teacher's
only in MLP width takes the teacher's most important MLP channels (largest summed squared weights
over the layer's MLP tensors); any other shape mismatch stays randomly initialised and is listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compress.errors import UserError
from compress.select import find_blocks
from distill.config import StudentConfig


@dataclass
class StudentInit:
    copied: int = 0
    sliced: int = 0
    random: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"copied_tensors": self.copied, "sliced_tensors": self.sliced, "random_tensors": self.random}


def layer_count(config) -> int:
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise UserError(f"{config.model_type} config has no layer count (num_hidden_layers): this architecture "
                        "cannot be mapped")
    return count


def _intermediate(config) -> int | None:
    for key in ("intermediate_size", "ffn_dim", "n_inner"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def student_config(teacher_config, shape: StudentConfig, layer_map: list[int]):
    """The teacher's config with the student's shape."""
    config = teacher_config.__class__.from_dict(teacher_config.to_dict())
    config.num_hidden_layers = len(layer_map)
    per_layer = getattr(teacher_config, "layer_types", None)
    if isinstance(per_layer, list) and len(per_layer) == layer_count(teacher_config):
        config.layer_types = [per_layer[g - 1] for g in layer_map]
    heads = shape.attention_heads or teacher_config.num_attention_heads
    hidden = shape.hidden_size or teacher_config.hidden_size
    if hidden % heads:
        raise UserError(f"student hidden_size {hidden} is not divisible by its {heads} attention heads: "
                        "choose a multiple of the head count")
    if shape.hidden_size or shape.attention_heads:
        config.hidden_size = hidden
        config.num_attention_heads = heads
        if getattr(teacher_config, "head_dim", None) is not None:
            config.head_dim = hidden // heads
        kv = getattr(teacher_config, "num_key_value_heads", None)
        if kv is not None and heads % kv:
            config.num_key_value_heads = heads
    if shape.intermediate_size:
        if _intermediate(teacher_config) is None:
            raise UserError(f"{teacher_config.model_type} has no intermediate_size: student.intermediate_size cannot "
                            "be set for this architecture")
        for key in ("intermediate_size", "ffn_dim", "n_inner"):
            if isinstance(getattr(teacher_config, key, None), int):
                setattr(config, key, shape.intermediate_size)
    return config


def build_student(teacher: nn.Module, shape: StudentConfig, layer_map: list[int]) -> tuple[nn.Module, StudentInit]:
    config = student_config(teacher.config, shape, layer_map)
    torch.manual_seed(0)  # the random part of the init is reproducible; the run seed drives training
    student = type(teacher)(config)
    init = StudentInit()
    if shape.init == "teacher":
        init = copy_from_teacher(student, teacher, layer_map)
    else:
        init.random = [name for name, _ in student.state_dict().items()]
    student.to(next(teacher.parameters()).dtype if next(teacher.parameters()).is_floating_point() else torch.float32)
    return student, init


def copy_from_teacher(student: nn.Module, teacher: nn.Module, layer_map: list[int]) -> StudentInit:
    prefix, _ = find_blocks(teacher)
    teacher_state = teacher.state_dict()
    width_t = _intermediate(teacher.config)
    width_s = _intermediate(student.config)
    init = StudentInit()
    keep: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            source = _teacher_name(name, prefix, layer_map)
            original = teacher_state.get(source)
            if original is None:
                init.random.append(name)
            elif original.shape == tensor.shape:
                tensor.copy_(original.to(tensor.dtype))
                init.copied += 1
            elif width_t and width_s and width_s < width_t and _only_mlp_width_differs(original, tensor, width_t,
                                                                                       width_s):
                block = int(source[len(prefix) + 1:].split(".")[0])
                if block not in keep:
                    keep[block] = mlp_channels(teacher_state, f"{prefix}.{block}.", width_t, width_s)
                tensor.copy_(_select(original, keep[block], width_t).to(tensor.dtype))
                init.sliced += 1
            else:
                init.random.append(name)
    return init


def _teacher_name(name: str, prefix: str, layer_map: list[int]) -> str:
    if not name.startswith(prefix + "."):
        return name
    index, _, rest = name[len(prefix) + 1:].partition(".")
    return f"{prefix}.{layer_map[int(index)] - 1}.{rest}"


def _only_mlp_width_differs(original: torch.Tensor, tensor: torch.Tensor, width_t: int, width_s: int) -> bool:
    if original.dim() != tensor.dim():
        return False
    return all(a == b or (a == width_t and b == width_s) for a, b in zip(original.shape, tensor.shape))


def mlp_channels(state: dict[str, torch.Tensor], block_prefix: str, width_t: int, width_s: int) -> torch.Tensor:
    """Indices of the ``width_s`` MLP channels with the largest summed squared weights in this block."""
    score = torch.zeros(width_t, dtype=torch.float64)
    for name, tensor in state.items():
        if not name.startswith(block_prefix) or not tensor.is_floating_point():
            continue
        for dim, size in enumerate(tensor.shape):
            if size == width_t:
                other = [d for d in range(tensor.dim()) if d != dim]
                score += tensor.double().pow(2).sum(dim=other) if other else tensor.double().pow(2)
    return torch.sort(torch.topk(score, width_s).indices).values


def _select(tensor: torch.Tensor, channels: torch.Tensor, width_t: int) -> torch.Tensor:
    for dim, size in enumerate(tensor.shape):
        if size == width_t:
            tensor = tensor.index_select(dim, channels)
    return tensor


@dataclass
class StudentSource:
    """A ready-made student folder (e.g. from structured pruning) and what its manifest says of it."""
    path: Path
    config: object
    layers: int
    teacher_layers: list[int] | None
    """1-based teacher blocks the student's blocks were, when it was made by removing layers."""


def student_source(reference: str) -> StudentSource:
    from transformers import AutoConfig

    from compress.checkpoint import read_manifest
    from compress.models import resolve

    path = resolve(reference).path
    config = AutoConfig.from_pretrained(path)
    structure = (read_manifest(path) or {}).get("structure") or {}
    kept = structure.get("kept_layers")
    return StudentSource(path, config, layer_count(config), [k + 1 for k in kept] if kept else None)


def load_student(source: StudentSource, teacher: nn.Module) -> tuple[nn.Module, StudentInit]:
    """The student folder loaded into the teacher's model class (so a classifier teacher gets a
    classifier student); tensors the folder lacks (a task head) come from the teacher where shapes match."""
    from compress.models import quiet_transformers

    if source.config.model_type != teacher.config.model_type:
        raise UserError(f"student.from_model {source.path} is a {source.config.model_type} model but the teacher is "
                        f"{teacher.config.model_type}: start from a model pruned from the teacher")
    if getattr(source.config, "vocab_size", None) != getattr(teacher.config, "vocab_size", None):
        raise UserError(f"student.from_model {source.path} has another vocabulary than the teacher: start from a "
                        "model pruned from the teacher")
    config = source.config
    for key in ("num_labels", "id2label", "label2id", "problem_type"):
        if hasattr(teacher.config, key):
            setattr(config, key, getattr(teacher.config, key))
    with quiet_transformers():
        student, info = type(teacher).from_pretrained(source.path, config=config, dtype=torch.float32,
                                                      use_safetensors=True, output_loading_info=True)
    init = StudentInit()
    teacher_state = teacher.state_dict()
    missing = set(info.get("missing_keys", ()))
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            if name not in missing:
                init.copied += 1
            elif name in teacher_state and teacher_state[name].shape == tensor.shape:
                tensor.copy_(teacher_state[name].to(tensor.dtype))
                init.copied += 1
            else:
                init.random.append(name)
    student.to(next(teacher.parameters()).dtype)
    return student, init
