"""The typed, versioned bench result: every committed result reads, round trips, and damage is named."""

import json
from pathlib import Path

import pytest

from compress.bench.result import SCHEMA_VERSION, BenchResult, DecodeResult
from compress.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = sorted(p for p in ROOT.glob("reports/**/*.json")
                   if json.loads(p.read_text()).__class__ is dict
                   and json.loads(p.read_text()).get("schema") == "compress-workbench/bench")


def _leaves(value, path=()):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        for i, item in enumerate(value):
            yield from _leaves(item, (*path, i))
    else:
        yield path, value


def _at(value, path):
    for key in path:
        value = value[key]
    return value


def test_committed_version_1_results_exist_so_the_upgrade_is_exercised():
    versions = {json.loads(p.read_text())["schema_version"] for p in COMMITTED}
    assert len(COMMITTED) > 40 and 1 in versions


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_committed_result_reads_and_keeps_every_figure(path):
    raw = json.loads(path.read_text())
    result = BenchResult.read(path)
    assert BenchResult.from_json(result.to_json()) == result
    written = result.to_dict()
    assert written["schema_version"] == SCHEMA_VERSION
    for where, value in _leaves(raw):
        if where[0] == "schema_version":
            continue
        if where[0] not in written:  # a version-1 file's own additions are its annotations
            assert raw["schema_version"] == 1 and result.annotations[where[0]] == raw[where[0]]
            continue
        assert _at(written, where) == value, where


def _a_result() -> dict:
    return json.loads(next(p for p in COMMITTED if "smollm2-cpu" in str(p) and p.name == "gptq-w4g128.json")
                      .read_text())


def test_typed_access_replaces_string_keys():
    result = BenchResult.from_dict(_a_result())
    assert isinstance(result.speed.decode[0], DecodeResult)
    assert result.speed.decode_at(1).batch == 1
    assert result.speed.largest_decode_batch().batch > 1
    assert result.model.method == "gptq" and result.model.quantization["bits"] == 4
    assert result.memory.inference_peak_bytes == result.memory.peak_speed_bytes
    assert result.protocol.windows_key()[0] == result.protocol.eval.sha256


def test_a_version_1_result_keeps_its_extra_keys_as_annotations():
    raw = _a_result() | {"minutes": 3.5}
    result = BenchResult.from_dict(raw)
    assert result.annotations == {"minutes": 3.5} and result.schema_version == SCHEMA_VERSION


@pytest.mark.parametrize("damage, said", [
    (lambda r: r["speed"]["prefill"].update(tokens_per_sec=1.0), "result.speed.prefill: unknown field tokens_per_sec"),
    (lambda r: r["memory"].pop("weight_bytes"), "result.memory: missing field weight_bytes"),
    (lambda r: r["speed"]["decode"][1].update(batch="eight"), "result.speed.decode[1].batch: expected int"),
    (lambda r: r.update(accuracy=[]), "result.accuracy: expected an object"),
])
def test_a_damaged_result_is_named_not_half_read(tmp_path, damage, said):
    raw = _a_result()
    raw["schema_version"] = SCHEMA_VERSION
    damage(raw)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError, match="damaged") as caught:
        BenchResult.read(path)
    assert said in str(caught.value) and "\n" not in str(caught.value)


def test_a_version_2_file_with_a_version_1_extra_key_is_refused(tmp_path):
    raw = _a_result() | {"schema_version": SCHEMA_VERSION, "minutes": 1.0}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError, match="unknown field minutes"):
        BenchResult.read(path)


def test_writing_is_atomic_and_reads_back_equal(tmp_path):
    result = BenchResult.from_dict(_a_result())
    path = result.write(tmp_path / "sub" / "r.json")
    assert BenchResult.read(path) == result
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]
