"""compress.typed_json: strict reading of dataclasses from JSON values."""

from dataclasses import dataclass, field

import pytest

from compress.typed_json import RecordError, from_plain, to_plain


@dataclass
class Inner:
    x: float
    tags: list[str] = field(default_factory=list)


@dataclass
class Outer:
    name: str
    inner: Inner | None
    many: list[Inner] = field(default_factory=list)
    free: dict = field(default_factory=dict)
    count: int | dict[str, int] | None = None


def test_round_trip_and_ints_read_as_floats():
    value = Outer("a", Inner(1.5, ["t"]), [Inner(2.0)], {"k": [1, {"n": None}]}, {"a": 1})
    assert from_plain(Outer, to_plain(value)) == value
    read = from_plain(Outer, {"name": "a", "inner": {"x": 3}})
    assert read.inner.x == 3.0 and isinstance(read.inner.x, float) and read.many == [] and read.count is None


@pytest.mark.parametrize("plain, said", [
    ({"name": "a", "inner": None, "extra": 1}, "Outer: unknown field extra"),
    ({"inner": None}, "Outer: missing field name"),
    ({"name": 1, "inner": None}, "Outer.name: expected str"),
    ({"name": "a", "inner": {"x": True}}, "Outer.inner.x: expected float"),
    ({"name": "a", "inner": None, "many": [{"x": 1}, {"y": 2}]}, "Outer.many[1]: unknown field y"),
    ({"name": "a", "inner": None, "count": True}, "Outer.count"),
    ({"name": "a", "inner": None, "many": {}}, "Outer.many: expected a list"),
])
def test_what_the_types_do_not_describe_is_named(plain, said):
    with pytest.raises(RecordError, match=None) as caught:
        from_plain(Outer, plain)
    assert said in str(caught.value)
