"""Two runs racing for one output folder, and damaged files a run reads back: results, manifests, cached base
references, partial runs' progress records and weights are checked, never trusted."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from compress.cli import main
from tests.conftest import assert_same_checkpoint
from tests.faults.harness import child_env, run_plain


HOLDS_THE_LOCK = r"""
import os, sys, time
from pathlib import Path
from compress.fsutil import OutputLock

real, flag = OutputLock.acquire, Path(sys.argv[1])


def acquire(self):
    # The lock is taken: say so, and hold it (bounded) until the test has sent the second run in.
    held = real(self)
    flag.with_suffix(".held").write_text(str(os.getpid()))
    deadline = time.time() + 300
    while not flag.with_suffix(".go").exists() and time.time() < deadline:
        time.sleep(0.05)
    return held


OutputLock.acquire = acquire
from compress.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_two_runs_racing_for_one_output_folder(deep_llama, tmp_path, record_fault):
    """A real race: the first run holds the output (its lock taken, its partial folder about to be written) while
    the second run is started on the same --out; the second stops with one line naming the first."""
    out = tmp_path / "out"
    args = ["quantize", str(deep_llama), "--method", "rtn", "--bits", "4", "--group-size", "32", "--device", "cpu",
            "--no-progress", "--out", str(out)]
    flag = tmp_path.parent / f"{tmp_path.name}-flag"
    first = subprocess.Popen([sys.executable, "-c", HOLDS_THE_LOCK, str(flag), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        deadline = time.time() + 300
        while not flag.with_suffix(".held").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "slow"
            time.sleep(0.05)
        second = run_plain(args)  # starts and ends while the first holds the output
    finally:
        flag.with_suffix(".go").write_text("")
        first_code = first.wait(timeout=600)
    assert first_code == 0, first.stderr.read()
    assert second.returncode == 2 and second.lines == [
        f"error: another run (process {first.pid}) is writing {out}: wait for it to end, or choose another --out"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # one folder, no partial or lock left
    alone = tmp_path.parent / f"{tmp_path.name}-alone"
    assert run_plain([*args[:-1], str(alone)]).returncode == 0
    assert_same_checkpoint(out, alone)
    record_fault("quantize", "a second run started while the first holds the --out", "race",
                 ["the second: exit code 2 and one line naming the first's process", "the first completes",
                  "one complete folder, equal to a lone run's", "no partial folder or lock left"])


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
