"""What --force may replace, for every command that takes --out: a complete earlier output of ours or an empty
folder, never a folder holding anything we did not write, never the source or anything inside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from compress.cli import main as compress_main
from compress.errors import UserError
from compress.formats import packed_settings
from compress.output import INVENTORY_FILE, atomic_folder, foreign_entries, refuse_existing, seal
from distill.cli import main as distill_main
from tests.faults.harness import tree_digest

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "reports" / "smollm2-cpu" / "results" / "fp32.json"


@pytest.fixture(scope="module")
def source() -> Path:
    from compress.models import resolve

    return resolve("tiny-llama").path


def _distill_config(folder: Path, calib: Path) -> Path:
    path = folder / "distill.yaml"
    path.write_text(yaml.safe_dump({"teacher": "tiny-llama", "data": str(calib), "eval": str(calib), "seqlen": 16,
                                    "max_examples": 8, "progress": False, "student": {"layers": 1},
                                    "stages": [{"kind": "prediction", "max_steps": 1, "batch_size": 4}]}))
    return path


def _sweep_config(folder: Path, calib: Path, report: Path) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny-llama", "name": "t", "runs": str(folder / "runs"),
                                    "report": str(report), "device": "cpu", "dtypes": ["float32"], "methods": ["rtn"],
                                    "bits": [4], "group_sizes": [32], "peers": [], "calib": str(calib),
                                    "nsamples": 2, "calib_seqlen": 16, "eval": str(calib), "seqlen": 16,
                                    "windows": 1, "decode_tokens": 1, "decode_batches": [1], "repeats": 1,
                                    "isolate": False, "progress": False}))
    return path


def _recipe_config(folder: Path, calib: Path, report: Path) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny-llama", "name": "r", "runs": str(folder / "runs"),
                                    "report": str(report), "device": "cpu", "progress": False,
                                    "bench": {"eval": str(calib), "seqlen": 16, "windows": 1, "speed": False},
                                    "stages": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}]},
                                   sort_keys=False))
    return path


COMMON = ["--device", "cpu", "--no-progress"]
COMMANDS = {
    "quantize": lambda src, out, tmp, calib: (compress_main, ["quantize", src, "--method", "rtn", "--bits", "8",
                                                              "--out", out, "--force", *COMMON]),
    "quantize-gptq": lambda src, out, tmp, calib: (compress_main, ["quantize", src, "--calib", str(calib),
                                                                   "--nsamples", "2", "--seqlen", "16", "--out", out,
                                                                   "--force", *COMMON]),
    "quantize-bnb": lambda src, out, tmp, calib: (compress_main, ["quantize", src, "--method", "bnb", "--bits", "8",
                                                                  "--out", out, "--force", *COMMON]),
    "prune": lambda src, out, tmp, calib: (compress_main, ["prune", src, "--method", "magnitude", "--sparsity", "0.5",
                                                           "--out", out, "--force", *COMMON]),
    "prune-structured": lambda src, out, tmp, calib: (compress_main, [
        "prune", src, "--method", "structured", "--target", "mlp", "--sparsity", "0.25", "--calib", str(calib),
        "--nsamples", "2", "--seqlen", "16", "--out", out, "--force", *COMMON]),
    "export-onnx": lambda src, out, tmp, calib: (compress_main, ["export-onnx", src, "--out", out, "--force"]),
    "export-gguf": lambda src, out, tmp, calib: (compress_main, ["export-gguf", src, "--type", "f16", "--out", out,
                                                                 "--force"]),
    "distill": lambda src, out, tmp, calib: (distill_main, ["run", str(_distill_config(tmp, calib)), "--out", out,
                                                            "--force"]),
    "report": lambda src, out, tmp, calib: (compress_main, ["report", str(RESULT), "--out", out, "--force"]),
    "sweep": lambda src, out, tmp, calib: (compress_main, ["sweep", str(_sweep_config(tmp, calib, Path(out)))]),
    "recipe": lambda src, out, tmp, calib: (compress_main, ["recipe", "run",
                                                            str(_recipe_config(tmp, calib, Path(out)))]),
}


def _earlier_output_and_notes(out: Path) -> None:
    """The issue's folder: an earlier output of ours under it, and a file of the user's beside it."""
    first = out / "first-model"
    first.mkdir(parents=True)
    (first / "config.json").write_text("{}")
    seal(first)
    (out / "notes.txt").write_text("notes\n")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_force_never_replaces_a_folder_holding_what_we_did_not_write(command, source, tmp_path, calib_file, capsys):
    out = tmp_path / "out"
    _earlier_output_and_notes(out)
    before = tree_digest(out)
    entry, args = COMMANDS[command](str(source), str(out), tmp_path, calib_file)
    assert entry(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    if command == "export-gguf":  # --out names a file there: a folder is refused as such
        assert err == [f"error: --out {out} is a folder: --out names the file to write, e.g. {out / 'model.gguf'}"]
    else:
        assert err == [f"error: {out}/ holds first-model/ and notes.txt, which this command did not write; "
                       "choose another --out"]
    assert tree_digest(out) == before and sorted(p.name for p in out.iterdir()) == ["first-model", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_the_issues_reproduction_with_real_outputs(source, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--method", "rtn", *COMMON]
    assert compress_main(["quantize", str(source), *common, "--out", "out/first-model"]) == 0
    Path("out/notes.txt").write_text("notes\n")
    before = tree_digest(Path("out"))
    capsys.readouterr()
    assert compress_main(["quantize", str(source), *common, "--bits", "8", "--out", "out", "--force"]) == 2
    assert capsys.readouterr().err == ("error: out/ holds first-model/ and notes.txt, which this command did not "
                                       "write; choose another --out\n")
    assert tree_digest(Path("out")) == before
    # --force does replace a complete earlier output of ours, and an empty folder.
    assert compress_main(["quantize", str(source), *common, "--bits", "8", "--out", "out/first-model",
                          "--force"]) == 0
    assert packed_settings(json.loads(Path("out/first-model/config.json").read_text())["quantization_config"]).bits == 8
    Path("empty").mkdir()
    assert compress_main(["quantize", str(source), *common, "--out", "empty", "--force"]) == 0
    # ... but not once a file of the user's is inside it.
    Path("out/first-model/my-eval.txt").write_text("mine")
    assert compress_main(["quantize", str(source), *common, "--out", "out/first-model", "--force"]) == 2
    assert "holds my-eval.txt, which this command did not write" in capsys.readouterr().err
    assert Path("out/first-model/my-eval.txt").read_text() == "mine"


def test_a_gguf_file_is_replaced_only_when_it_is_ours(source, tmp_path, capsys):
    target = tmp_path / "m.gguf"
    args = ["export-gguf", str(source), "--type", "f16", "--out", str(target)]
    assert compress_main(args) == 0
    assert compress_main([*args, "--force"]) == 0  # ours: replaced
    foreign = tmp_path / "theirs.gguf"
    shutil.copyfile(target, foreign)
    foreign.write_bytes(foreign.read_bytes().replace(b"compress-workbench", b"someone-else-here!"))
    capsys.readouterr()
    assert compress_main(["export-gguf", str(source), "--type", "f16", "--out", str(foreign), "--force"]) == 2
    assert "was not written by compress-workbench" in capsys.readouterr().err
    assert b"someone-else-here!" in foreign.read_bytes()


@pytest.mark.parametrize("command", ["quantize", "quantize-bnb", "prune-structured", "export-onnx", "export-gguf",
                                     "distill"])
def test_out_inside_the_source_is_refused_even_with_force(command, tmp_path, calib_file, capsys):
    from compress.models import resolve

    source = tmp_path / "src"
    shutil.copytree(resolve("tiny-llama").path, source)
    before = tree_digest(source)
    weights = source / "model.safetensors"
    assert weights.is_file()
    entry, args = COMMANDS[command](str(source), str(weights), tmp_path, calib_file)
    if command == "distill":
        args[1] = str(_distill_config(tmp_path, calib_file).rename(tmp_path / "d.yaml"))
        text = Path(args[1]).read_text().replace("teacher: tiny-llama", f"teacher: {source}")
        Path(args[1]).write_text(text)
    assert entry(args) == 2
    err = capsys.readouterr().err
    assert f"is inside the source model's folder ({source})" in err and err.count("\n") == 1
    assert tree_digest(source) == before
    assert sorted(p.name for p in source.iterdir()) == sorted(Path(p).parts[0] for p in before)


def test_out_equal_to_the_source_is_named_as_the_source_first(tmp_path, capsys):
    """Not 'pass --force': the existing-output check comes after the overlap check."""
    from compress.models import resolve

    source = tmp_path / "src"
    shutil.copytree(resolve("tiny-llama").path, source)
    assert compress_main(["quantize", str(source), "--method", "rtn", "--out", str(source), *COMMON]) == 2
    assert "is the source model's folder: choose an output folder outside it" in capsys.readouterr().err


def test_inventory_rules(tmp_path):
    with atomic_folder(tmp_path / "o") as partial:
        (partial / "sub").mkdir()
        (partial / "sub" / "a.bin").write_bytes(b"a")
        (partial / "b.json").write_text("{}")
    out = tmp_path / "o"
    listed = json.loads((out / INVENTORY_FILE).read_text())
    assert listed == {"written_by": "compress-workbench", "files": ["b.json", "sub/a.bin"]}
    assert foreign_entries(out) == []
    refuse_existing(out, force=True)  # ours: may be replaced
    (out / "b.json").unlink()  # a file of ours removed: still ours
    refuse_existing(out, force=True)
    (out / "sub" / "extra").mkdir()
    assert foreign_entries(out) == ["sub/"]
    with pytest.raises(UserError, match="holds sub/, which this command did not write"):
        refuse_existing(out, force=True)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "compress_manifest.json").write_text("{}")
    with pytest.raises(UserError, match="too old to record its files"):
        refuse_existing(legacy, force=True)
    many = tmp_path / "many"
    many.mkdir()
    for i in range(8):
        (many / f"f{i}").write_text("")
    with pytest.raises(UserError, match=r"holds f0, f1, f2, f3, f4 and 3 more, which"):
        refuse_existing(many, force=True)
