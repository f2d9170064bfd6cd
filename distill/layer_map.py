"""The layer map g: student layer m (1..M) learns from teacher layer g(m) (1..N); 0 (the embedding
layer) always maps to 0, as in TinyBERT."""

from __future__ import annotations

from compress.errors import UserError


def uniform_map(student_layers: int, teacher_layers: int) -> list[int]:
    """g(m) = m * N / M (rounded down), so the last student layer learns from the last teacher layer."""
    return [m * teacher_layers // student_layers for m in range(1, student_layers + 1)]


def resolve_layer_map(spec: str | list[int], student_layers: int, teacher_layers: int) -> list[int]:
    """[g(1), ..., g(M)] from the config's 'uniform' or explicit list, checked against both models."""
    if student_layers > teacher_layers:
        raise UserError(f"the student has {student_layers} layers, more than the teacher's {teacher_layers}: "
                        "a student must be at most as deep as its teacher (set student.layers lower)")
    if spec == "uniform":
        return uniform_map(student_layers, teacher_layers)
    if len(spec) != student_layers:
        raise UserError(f"layer_map has {len(spec)} entries but the student has {student_layers} layers: "
                        "give one teacher layer per student layer")
    for m, g in enumerate(spec, start=1):
        if not 1 <= g <= teacher_layers:
            raise UserError(f"layer_map entry {g} for student layer {m} is out of range: teacher layers are "
                            f"1..{teacher_layers}")
    if any(b <= a for a, b in zip(spec, spec[1:])):
        raise UserError(f"layer_map {spec} must increase strictly: deeper student layers learn from deeper "
                        "teacher layers")
    return list(spec)
