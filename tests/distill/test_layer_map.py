import pytest

from compress.errors import UserError
from distill.layer_map import resolve_layer_map, uniform_map


def test_uniform_map_is_tinybert_g():
    assert uniform_map(4, 12) == [3, 6, 9, 12]
    assert uniform_map(3, 6) == [2, 4, 6]
    assert uniform_map(10, 30) == list(range(3, 31, 3))
    assert uniform_map(2, 2) == [1, 2]


def test_explicit_map_is_kept():
    assert resolve_layer_map([1, 5, 6], 3, 6) == [1, 5, 6]


@pytest.mark.parametrize("spec,student,teacher,words", [
    ("uniform", 7, 6, "more than the teacher"),
    ([0, 3], 2, 6, "out of range"),
    ([2, 7], 2, 6, "out of range"),
    ([2, 4], 3, 6, "3 layers"),
    ([4, 2], 2, 6, "increase"),
])
def test_bad_maps_are_user_errors(spec, student, teacher, words):
    with pytest.raises(UserError, match=words):
        resolve_layer_map(spec, student, teacher)
