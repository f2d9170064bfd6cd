"""Student construction from the teacher's config, on tiny checkpoints of every seed architecture."""

import pytest
import torch

from compress.models import load_model, resolve
from distill.config import StudentConfig
from distill.student import build_student, layer_count, mlp_channels
from tests.conftest import ALL_ARCHS


@pytest.fixture(scope="module", params=ALL_ARCHS)
def teacher(request):
    model, _ = load_model(resolve(f"tiny-{request.param}").path)
    return model


def _block_state(model, index):
    from compress.select import find_blocks

    return find_blocks(model)[1][index].state_dict()


def test_student_takes_the_mapped_teacher_layers(teacher, tmp_path):
    student, init = build_student(teacher, StudentConfig(layers=1), [2])
    assert layer_count(student.config) == 1
    assert not init.random and init.copied > 0
    for name, tensor in _block_state(student, 0).items():
        assert torch.equal(tensor, _block_state(teacher, 1)[name]), name
    # Reloads with from_pretrained, and its config matches its weights.
    student.save_pretrained(tmp_path)
    reloaded = type(student).from_pretrained(tmp_path)
    assert layer_count(reloaded.config) == 1
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


def test_random_init_copies_nothing(teacher):
    student, init = build_student(teacher, StudentConfig(layers=1, init="random"), [1])
    assert init.copied == 0 and init.random


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_narrower_mlp_keeps_the_most_important_channels(arch):
    teacher, _ = load_model(resolve(f"tiny-{arch}").path)
    student, init = build_student(teacher, StudentConfig(layers=2, intermediate_size=64), [1, 2])
    assert init.sliced > 0 and not init.random
    t_state = teacher.state_dict()
    prefix = "model.layers" if arch == "llama" else "encoder.layer"
    keep = mlp_channels(t_state, f"{prefix}.0.", 128, 64)
    assert keep.numel() == 64 and torch.all(keep[1:] > keep[:-1])
    up = "mlp.up_proj.weight" if arch == "llama" else "intermediate.dense.weight"
    down = "mlp.down_proj.weight" if arch == "llama" else "output.dense.weight"
    s_state = student.state_dict()
    assert torch.equal(s_state[f"{prefix}.0.{up}"], t_state[f"{prefix}.0.{up}"][keep])
    assert torch.equal(s_state[f"{prefix}.0.{down}"], t_state[f"{prefix}.0.{down}"][:, keep])
    # The kept channels are the heaviest: no dropped channel outweighs a kept one.
    score = t_state[f"{prefix}.0.{up}"].pow(2).sum(1) + t_state[f"{prefix}.0.{down}"].pow(2).sum(0)
    if arch == "llama":
        score += t_state[f"{prefix}.0.mlp.gate_proj.weight"].pow(2).sum(1)
    dropped = torch.ones(128, dtype=torch.bool)
    dropped[keep] = False
    assert score[keep].min() >= score[dropped].max()


def test_narrower_hidden_is_random_where_shapes_differ():
    teacher, _ = load_model(resolve("tiny-llama").path)
    student, init = build_student(teacher, StudentConfig(layers=1, hidden_size=32), [2])
    assert student.config.hidden_size == 32 and student.config.head_dim == 8
    assert init.random  # every tensor with the hidden width
    with torch.no_grad():
        assert student(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, teacher.config.vocab_size)
