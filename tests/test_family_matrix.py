"""The support matrix: every command on every tiny family (the seed ones and today's), each cell read back in the tool
that claims to read its output (our loader, transformers, onnxruntime, llama.cpp) or refused in one line, exit 2,
before any long work. Every outcome must be the one reports/family-matrix.json holds (benchmarks/family_matrix.py
runs this file to write it, and renders the README's table from it): a cell that starts failing or starts being
refused fails here.

Slow (about a quarter of an hour on 2 cores): CI runs it."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

from compress.report.matrix import COMMANDS, OK, REFUSED, Cell, cells_from_json, cells_to_json
from compress.tiny import TINY_CONFIGS
from tests.conftest import model_output

pytestmark = pytest.mark.slow

FAMILIES = list(TINY_CONFIGS)
PINNED = Path(__file__).resolve().parent.parent / "reports" / "family-matrix.json"
RECORD = os.environ.get("COMPRESS_MATRIX_OUT")
"""Where benchmarks/family_matrix.py wants the outcomes written (then they are recorded, not compared)."""
REFUSAL_SECONDS = 10.0
"""A refusal comes before any long work: a tiny model's whole quantization takes about as long."""
IDS = [5, 17, 99, 200, 301, 44, 7, 8, 400, 3, 12, 77]
CPU = torch.device("cpu")


def run_cli(argv: list[str], program: str = "compress") -> tuple[int, str, float]:
    """(exit status, stderr, seconds) of one command run in this process."""
    if program == "distill":
        from distill.cli import main
    else:
        from compress.cli import main
    err = io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as exc:
            status = exc.code
    return status, err.getvalue(), time.monotonic() - started


def refusal(status: int, err: str, seconds: float, out: Path | None) -> Cell | None:
    """The cell's refusal, checked to be one: exit 2, one error line and nothing after it, quickly, no output left.
    Its line is kept without this run's temporary folders (the W4 checkpoint is named as such)."""
    if status == 0:
        return None
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert status == 2, f"exit {status}, not a refusal:\n{err[-3000:]}"
    assert len(errors) == 1 and lines[-1] == errors[0], f"not one error line:\n{err[-3000:]}"
    assert seconds < REFUSAL_SECONDS, f"refused only after {seconds:.1f} s: {errors[0]}"
    assert out is None or not out.exists(), f"{out} was left behind by a refusal"
    line = errors[0]
    if out is not None:
        line = line.replace(f"{out.parent}/w4g32", "the W4 g32 checkpoint").replace(f"{out.parent}/", "")
    return Cell(REFUSED, line)


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


class Family:
    """One family's tiny model, its inputs, and what its cells share (the float model, a W4 g32 checkpoint)."""

    def __init__(self, name: str, root: Path, calib: Path, text: Path) -> None:
        self.name, self.root, self.calib, self.text = name, root, calib, text
        self.model = f"tiny-{name}"
        self._float = None
        self._w4 = None

    @property
    def calibration(self) -> list[str]:
        return ["--calib", str(self.calib), "--nsamples", "4", "--seqlen", "32"]

    def float_model(self):
        if self._float is None:
            from compress.models import load_model, resolve

            self._float = load_model(resolve(self.model).path)[0].eval()
        return self._float

    def w4_checkpoint(self) -> tuple[Path | None, Cell | None]:
        """The symmetric W4 g32 checkpoint that export-onnx int4 and export-gguf q4_0 take (or quantize's refusal)."""
        if self._w4 is None:
            out = self.root / "w4g32"
            status, err, seconds = run_cli(["quantize", self.model, "--method", "rtn", "--bits", "4", "--group-size",
                                            "32", "--sym", "--out", str(out), "--no-progress", "--device", "cpu"])
            self._w4 = (None, refusal(status, err, seconds, out)) if status else (out, None)
        return self._w4


# --- the cells --------------------------------------------------------------------------------------------------


def quantize_cell(family: Family, name: str, args: list[str]) -> Cell:
    from transformers import AutoConfig

    from compress.checkpoint import load_quantized, read_manifest
    from compress.models import auto_class

    out = family.root / name
    status, err, seconds = run_cli(["quantize", family.model, *args, "--out", str(out), "--no-progress",
                                    "--device", "cpu"])
    if (refused := refusal(status, err, seconds, out)) is not None:
        return refused
    ours, _ = load_quantized(out)
    ids = torch.tensor([IDS])
    mine = model_output(ours, ids)
    original = model_output(family.float_model(), ids)
    assert torch.isfinite(mine).all() and 0 < relative_gap(mine, original) < 1.0
    checked = ["our loader"]
    engines = read_manifest(out)["format"]["engines"]
    if any(engine.startswith("transformers") for engine in engines):
        theirs = auto_class(AutoConfig.from_pretrained(out)).from_pretrained(out, dtype=torch.float32).eval()
        # compressed-tensors unpacks to float32 (1.4e-4 seen for a tied 8-bit head through float16 rows); the GPTQ
        # layout runs GPTQModel's bf16 kernel.
        tolerance = 1e-3 if read_manifest(out)["format"]["name"] == "compressed-tensors" else 3e-2
        assert relative_gap(model_output(theirs, ids), mine) < tolerance
        checked.append("transformers")
    return Cell(OK, f"read back by {' and '.join(checked)}")


def prune_cell(family: Family, name: str, args: list[str]) -> Cell:
    from transformers import AutoConfig

    from compress.models import auto_class
    from compress.select import block_linears, find_blocks, ModuleSelection

    out = family.root / name
    status, err, seconds = run_cli(["prune", family.model, *args, *family.calibration, "--out", str(out),
                                    "--no-progress", "--device", "cpu"])
    if (refused := refusal(status, err, seconds, out)) is not None:
        return refused
    pruned = auto_class(AutoConfig.from_pretrained(out)).from_pretrained(out, dtype=torch.float32).eval()
    assert torch.isfinite(model_output(pruned, torch.tensor([IDS]))).all()
    if name == "prune-structured":
        parameters = [sum(p.numel() for p in model.parameters()) for model in (pruned, family.float_model())]
        assert parameters[0] < parameters[1]
        return Cell(OK, "smaller model read back by transformers")
    _, blocks = find_blocks(pruned)
    weights = [layer.weight for block in blocks for layer in block_linears(block, ModuleSelection()).values()]
    if name == "prune-2:4":
        assert all(bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()) for w in weights)
    else:
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert zeros >= 0.45, zeros
    return Cell(OK, "sparsity read back from transformers' model")


def bench_cell(family: Family, name: str, args: list[str]) -> Cell:
    out = family.root / f"{name}.json"
    status, err, seconds = run_cli(["bench", family.model, "--eval", str(family.text), "--windows", "2", "--seqlen",
                                    "32", "--no-speed", "--no-progress", "--device", "cpu", *args, "--out", str(out)])
    if (refused := refusal(status, err, seconds, out)) is not None:
        return refused
    accuracy = json.loads(out.read_text())["accuracy"]
    if name == "bench-tasks":
        rows = accuracy["tasks"]["results"]
        assert rows and rows[0]["examples"] == 4
        return Cell(OK, "lm-eval task scored")
    figure = (accuracy.get("perplexity") or {}).get("perplexity") or (accuracy.get("task") or {}).get("accuracy")
    if figure is None:  # a bare encoder (no LM or classifier head): its memory is what bench measures
        assert json.loads(out.read_text())["memory"]["weight_bytes"] > 0
        return Cell(OK, "memory measured (no head to score)")
    assert math.isfinite(figure)
    return Cell(OK, "scored")


def onnx_cell(family: Family, name: str, args: list[str]) -> Cell:
    from compress.bench.load import load_for_bench
    from compress.checkpoint import load_quantized
    from tests.ort.test_export import assert_matches

    source, reference, tolerance = family.model, None, 1e-4
    if name == "onnx-int4":
        source, refused = family.w4_checkpoint()
        if refused is not None:
            return refused
        reference = load_quantized(source)[0]
    elif name == "onnx-int8":
        tolerance = 0.1  # int8 weights and activations against float
    out = family.root / name
    status, err, seconds = run_cli(["export-onnx", str(source), *args, "--out", str(out)])
    if (refused := refusal(status, err, seconds, out)) is not None:
        return refused
    exported = load_for_bench(str(out), "auto", CPU).model
    assert_matches(reference or family.float_model(), exported, torch.tensor([IDS]), tolerance)
    return Cell(OK, "onnxruntime's logits (full pass and cached decode) match")


K_FROM_FLOAT = {"gemma2": 0.2, "gemma3": 0.35}


def gguf_cell(family: Family, name: str, args: list[str]) -> Cell:
    from compress.checkpoint import load_quantized
    from tests.export_gguf.llama_cpp_run import llama_cpp_logits, relative_error

    source, reference = family.model, None
    out = family.root / f"{name}.gguf"
    if name == "gguf-q4_0":
        source, refused = family.w4_checkpoint()
        if refused is not None:
            return refused
        reference = load_quantized(source)[0]
    elif name == "gguf-q8_0":
        args = [*args, "--method", "rtn", "--checkpoint", str(family.root / "q8-checkpoint")]
    status, err, seconds = run_cli(["export-gguf", str(source), *args, "--out", str(out), "--no-progress"])
    if (refused := refusal(status, err, seconds, out)) is not None:
        return refused
    if name == "gguf-q8_0":
        reference = load_quantized(family.root / "q8-checkpoint")[0]
    expected = model_output(reference or family.float_model(), torch.tensor([IDS]))[0]
    theirs, _ = llama_cpp_logits(out, IDS)
    # llama.cpp's int8 activations and float16 embedding: about 1% (tests/export_gguf). The K file is compared with
    # the float model, so its own rounding counts too (rows of 64 fall back to 5-bit blocks of 32): up to 0.074 seen
    # (MPT), 0.12 and 0.26 on Gemma 2 and 3, whose tiny models magnify rounding (tests/test_api.py).
    tolerance = 0.04 if name != "gguf-q4_k_m" else K_FROM_FLOAT.get(family.name, 0.1)
    assert relative_error(theirs, expected) < tolerance
    return Cell(OK, "llama.cpp's logits match")


def distill_cell(family: Family, name: str, args: list[str]) -> Cell:
    import yaml
    from transformers import AutoConfig

    from compress.models import auto_class

    out = family.root / "student"
    config = {"teacher": family.model, "student": {"layers": 1}, "data": str(family.calib), "seqlen": 16,
              "max_examples": 8, "eval": str(family.text), "eval_windows": 1, "eval_seqlen": 32, "progress": False,
              "device": "cpu", "stages": [{"kind": "intermediate", "max_steps": 2, "batch_size": 4, "lr": 1e-3}],
              "out": str(out)}
    path = family.root / "distill.yaml"
    path.write_text(yaml.safe_dump(config))
    status, err, seconds = run_cli(["run", str(path)], program="distill")
    if (refused := refusal(status, err, seconds, out)) is not None:
        return refused
    student = auto_class(AutoConfig.from_pretrained(out)).from_pretrained(out, dtype=torch.float32).eval()
    assert student.config.num_hidden_layers == 1 and torch.isfinite(model_output(student, torch.tensor([IDS]))).all()
    return Cell(OK, "one-layer student read back by transformers")


CELLS = {
    "quantize-rtn": (quantize_cell, ["--method", "rtn"]),
    "quantize-gptq": (quantize_cell, ["--method", "gptq", "CALIBRATION"]),
    "quantize-awq": (quantize_cell, ["--method", "awq", "CALIBRATION"]),
    "quantize-avg-bits": (quantize_cell, ["--method", "rtn", "--avg-bits", "5.5", "CALIBRATION"]),
    "quantize-lm-head": (quantize_cell, ["--method", "rtn", "--lm-head-bits", "8"]),
    "prune-wanda": (prune_cell, ["--method", "wanda", "--sparsity", "0.5"]),
    "prune-sparsegpt": (prune_cell, ["--method", "sparsegpt", "--sparsity", "0.5"]),
    "prune-2:4": (prune_cell, ["--method", "wanda", "--pattern", "2:4"]),
    "prune-structured": (prune_cell, ["--method", "structured", "--target", "mlp", "--sparsity", "0.25"]),
    "bench": (bench_cell, []),
    "bench-tasks": (bench_cell, ["--tasks", "arc_easy", "--limit", "4"]),
    "onnx-fp32": (onnx_cell, []),
    "onnx-int8": (onnx_cell, ["--weights", "int8"]),
    "onnx-int4": (onnx_cell, ["--accuracy-level", "0"]),  # float activations: our codes exactly
    "gguf-f16": (gguf_cell, ["--type", "f16"]),
    # The embedding and head in float16: the blocks are what is checked (llama.cpp's own types for them round a
    # random tiny embedding to 4 bits: 7.9% off on Llama).
    "gguf-q8_0": (gguf_cell, ["--type", "q8_0", "--float-embedding"]),
    "gguf-q4_0": (gguf_cell, ["--type", "q4_0", "--float-embedding"]),
    # A K file type fitted on the way (the tiny models' rows of 64 fall back to llama.cpp's blocks of 32: Q5_0).
    "gguf-q4_k_m": (gguf_cell, ["--type", "q4_k_m", "--method", "rtn", "--float-embedding"]),
    "distill": (distill_cell, []),
}


def test_every_column_of_the_table_is_a_cell_here():
    assert list(CELLS) == list(COMMANDS)


@pytest.fixture(scope="module")
def families(tmp_path_factory, calib_file, eval_file):
    made: dict[str, Family] = {}
    outcomes: dict[str, dict[str, Cell]] = {}
    yield made, outcomes
    if RECORD:
        Path(RECORD).write_text(cells_to_json(outcomes))


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("family", FAMILIES)
def test_cell(family, cell, families, tmp_path_factory, calib_file, eval_file, data_dir):
    made, outcomes = families
    if family not in made:
        made[family] = Family(family, tmp_path_factory.mktemp(family), calib_file, eval_file)
    check, args = CELLS[cell]
    args = [part for arg in args for part in (made[family].calibration if arg == "CALIBRATION" else [arg])]
    result = check(made[family], cell, args)
    outcomes.setdefault(family, {})[cell] = result
    if RECORD:
        return
    pinned = cells_from_json(PINNED).get(family, {}).get(cell)
    assert pinned is not None, f"{family} x {cell} is not in {PINNED.name}: run python benchmarks/family_matrix.py"
    assert result.outcome == pinned.outcome, (f"{family} x {cell} is now {result.outcome} ({result.detail}), "
                                              f"{PINNED.name} says {pinned.outcome} ({pinned.detail})")
