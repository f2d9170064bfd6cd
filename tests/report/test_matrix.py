"""The support matrix's table: rendered from its JSON, refusals numbered once per reason, and the README's copy
the one the committed outcomes give."""

from pathlib import Path

import pytest

from compress.report.matrix import (COMMANDS, MARKERS, OK, REFUSED, Cell, cells_from_json, cells_to_json, render_table,
                                    replace_between_markers)
from compress.tiny import TINY_CONFIGS

ROOT = Path(__file__).resolve().parents[2]


def test_refusals_are_numbered_once_per_reason_and_missing_cells_show():
    why = "error: tiny-x is a XForCausalLM: export-gguf does not know it"
    cells = {"a": {name: Cell(OK, "read back") for name in COMMANDS},
             "b": {"gguf-f16": Cell(REFUSED, why), "gguf-q8_0": Cell(REFUSED, why), "quantize-rtn": Cell(OK, "")}}
    table = render_table(cells, ["a", "b"])
    rows = table.splitlines()
    assert rows[2].count("yes") == len(COMMANDS)
    assert rows[3].count("no (1)") == 2 and rows[3].count("?") == len(COMMANDS) - 3
    assert table.rstrip().endswith("1. tiny-x is a XForCausalLM: export-gguf does not know it")


def test_the_json_round_trips(tmp_path):
    cells = {"llama": {"bench": Cell(OK, "scored")}}
    (tmp_path / "m.json").write_text(cells_to_json(cells))
    assert cells_from_json(tmp_path / "m.json") == cells


def test_the_readme_table_is_the_one_the_committed_outcomes_give():
    pinned = ROOT / "reports" / "family-matrix.json"
    if not pinned.is_file():
        pytest.fail("reports/family-matrix.json is missing: run python benchmarks/family_matrix.py")
    readme = (ROOT / "README.md").read_text()
    expected = replace_between_markers(readme, render_table(cells_from_json(pinned), list(TINY_CONFIGS)))
    assert readme == expected, "the README's table is stale: run python benchmarks/family_matrix.py --report-only"
    assert all(marker in readme for marker in MARKERS)
    assert set(cells_from_json(pinned)) == set(TINY_CONFIGS)
