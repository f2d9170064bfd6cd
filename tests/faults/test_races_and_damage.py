"""Two runs racing for one output folder, and damaged files a run reads back: results, manifests, cached base
references, partial runs' progress records and weights are checked, never trusted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from compress.cli import main
from tests.conftest import assert_same_checkpoint
from tests.faults.harness import child_env, run_plain


def test_two_runs_racing_for_one_output_folder(deep_llama, tmp_path, record_fault):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "compress.cli", "quantize", str(deep_llama), "--method", "rtn", "--bits", "4",
            "--group-size", "32", "--device", "cpu", "--no-progress", "--out", str(out)]
    racers = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
              for _ in range(2)]
    ended = [(r.wait(timeout=600), r.stderr.read()) for r in racers]
    codes = sorted(code for code, _ in ended)
    assert codes == [0, 2], ended
    loser = next(err for code, err in ended if code == 2)
    lines = [line for line in loser.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(out) in lines[0], loser
    assert "another run" in lines[0] or "already exists" in lines[0], loser
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # one folder, no partial or lock left
    alone = tmp_path.parent / f"{tmp_path.name}-alone"
    assert run_plain([*args[3:-1], str(alone)]).returncode == 0
    assert_same_checkpoint(out, alone)
    record_fault("quantize", "two processes started together on one --out", "race",
                 ["one exit code 0 and one exit code 2 with one line naming the folder", "one complete folder, "
                  "equal to a lone run's", "no partial folder or lock left"])


@pytest.fixture
def quantized(deep_llama, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", str(deep_llama), "--method", "rtn", "--bits", "4", "--group-size", "32", "--device",
                 "cpu", "--no-progress", "--out", str(out)]) == 0
    return out


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_damaged_manifest_is_an_error_not_an_empty_record(quantized, eval_file, capsys, record_fault):
    manifest = quantized / "compress_manifest.json"
    manifest.write_text(manifest.read_text()[:200])
    code = main(["bench", str(quantized), "--eval", str(eval_file), "--seqlen", "32", "--windows", "2", "--no-speed",
                 "--no-progress", "--device", "cpu"])
    assert code == 2 and "compress_manifest.json is damaged" in one_error_line(capsys)
    record_fault("bench", "a checkpoint's manifest cut in half", "damage", ["exit code 2, one line naming the file"])


def test_a_truncated_result_file_is_refused_by_report(tmp_path, capsys, record_fault):
    result = tmp_path / "r.json"
    result.write_text('{"schema": "compress-bench", "schema_ver')
    assert main(["report", str(result), "--out", str(tmp_path / "report")]) == 2
    assert "r.json is not a JSON file" in one_error_line(capsys)
    assert not (tmp_path / "report").exists()
    record_fault("report", "a bench result cut short", "damage", ["exit code 2, one line naming the file",
                                                                  "no report written"])


@pytest.mark.parametrize("damage", ["truncate", "other windows"])
def test_a_damaged_cached_reference_is_made_again(damage, deep_llama, eval_file, tmp_path, monkeypatch, capsys,
                                                  record_fault):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    args = ["bench", str(deep_llama), "--base", str(deep_llama), "--eval", str(eval_file), "--seqlen", "32",
            "--windows", "2", "--no-speed", "--no-progress", "--device", "cpu", "--dtype", "float32"]
    assert main([*args, "--out", str(tmp_path / "first.json")]) == 0
    (cached,) = (tmp_path / "cache" / "references").iterdir()
    if damage == "truncate":
        cached.write_bytes(cached.read_bytes()[:-100])
    else:  # a whole file, made on other windows, under this key
        from compress.bench.agreement import Reference

        reference = Reference.load(cached)
        reference.meta["windows_sha256"] = "0" * 64
        reference.save(cached)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "second.json")]) == 0
    assert f"the cached base reference {cached} is damaged" in capsys.readouterr().err
    first, second = (json.loads((tmp_path / f"{n}.json").read_text())["accuracy"] for n in ("first", "second"))
    assert first["agreement"] == second["agreement"] and first["perplexity"] == second["perplexity"]
    record_fault("bench", f"the cached base reference ({damage})", "damage",
                 ["said and made again", "the same KL and perplexity as with the whole reference"])


def test_a_damaged_progress_record_is_refused_by_resume(deep_llama, calib_file, tmp_path, capsys, record_fault):
    partial = tmp_path / ".q.partial"
    partial.mkdir()
    (partial / "progress.json").write_text('{"phase": "blo')
    code = main(["quantize", str(deep_llama), "--method", "gptq", "--calib", str(calib_file), "--nsamples", "4",
                 "--seqlen", "32", "--group-size", "32", "--device", "cpu", "--no-progress", "--out",
                 str(tmp_path / "q"), "--resume"])
    assert code == 2 and "progress.json is damaged" in one_error_line(capsys)
    record_fault("quantize", "a partial run's progress record cut short", "damage",
                 ["--resume: exit code 2, one line naming the file and the fix"])


def test_truncated_source_weights_are_refused(deep_llama, tmp_path, capsys, record_fault):
    import shutil

    source = tmp_path / "src"
    shutil.copytree(deep_llama, source)
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code = main(["quantize", str(source), "--method", "rtn", "--device", "cpu", "--no-progress", "--out",
                 str(tmp_path / "q")])
    assert code == 2 and "corrupt or truncated" in one_error_line(capsys)
    assert not (tmp_path / "q").exists()
    record_fault("quantize", "the source's weights cut in half", "damage",
                 ["exit code 2, one line naming the file", "no output"])
