"""`compress quantize` and `compress prune` under faults: SIGKILL, SIGTERM, Ctrl-C and a full disk, during
calibration and during the save. Each leaves no folder that looks complete, never touches the source, ends with
one line saying what was kept (where a handler can run), and the same command with --resume then writes the bytes
of an uninterrupted run."""

from __future__ import annotations

import pytest

from compress.output import PROGRESS_FILE
from tests.conftest import assert_same_checkpoint
from tests.faults.harness import assert_ended_as_expected, leftovers, run_plain, run_with_fault, tree_digest

CALIBRATION = "compress.quant.gptq:gptq_quantize"  # called once per layer: the 10th is in block 1
SAVE = "compress.shards:ShardWriter.finish"  # every block written: the output's shards are being closed
WRITE = "compress.shards:ShardWriter.add"  # a tensor written into the shards


def quantize_args(model, calib_file, out) -> list[str]:
    return ["quantize", str(model), "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib",
            str(calib_file), "--nsamples", "8", "--seqlen", "64", "--device", "cpu", "--no-progress",
            "--checkpoint-every", "0", "--max-shard-size", "50KB", "--out", str(out)]


def prune_args(model, calib_file, out) -> list[str]:
    return ["prune", str(model), "--method", "wanda", "--sparsity", "0.5", "--calib", str(calib_file), "--nsamples",
            "8", "--seqlen", "64", "--device", "cpu", "--no-progress", "--checkpoint-every", "0", "--out", str(out)]


COMMANDS = {"quantize": quantize_args, "prune": prune_args}


@pytest.fixture(scope="module")
def uninterrupted(deep_llama, calib_file, tmp_path_factory):
    """The output of each command run without a fault (in a child process, as the faulted runs are)."""
    folders = {}
    for command, args in COMMANDS.items():
        out = tmp_path_factory.mktemp("whole") / command
        done = run_plain(args(deep_llama, calib_file, out))
        assert done.returncode == 0, done.stderr
        folders[command] = out
    return folders


CASES = [
    # (command, point, nth call, fault, what the closing line must say was kept)
    ("quantize", CALIBRATION, 10, "SIGKILL", None),
    ("quantize", CALIBRATION, 10, "SIGTERM", "1 block(s) are written and kept in"),
    ("quantize", CALIBRATION, 10, "SIGINT", "1 block(s) are written and kept in"),
    ("quantize", SAVE, 1, "SIGKILL", None),
    ("quantize", SAVE, 1, "SIGTERM", "all blocks are written and kept in"),
    ("quantize", WRITE, 50, "ENOSPC", "block(s) are written and kept in"),
    ("prune", "compress.output:ModelOutput.checkpoint", 3, "SIGKILL", None),
    ("prune", "compress.output:ModelOutput.checkpoint", 3, "SIGTERM", "block(s) are written and kept in"),
    ("prune", SAVE, 1, "SIGINT", "all blocks are written and kept in"),
]


@pytest.mark.parametrize("command, point, nth, fault, kept", CASES,
                         ids=[f"{c}-{p.rsplit('.', 1)[-1]}-{f}" for c, p, _, f, _ in CASES])
def test_a_stopped_run_keeps_nothing_complete_and_resumes_to_the_same_bytes(
        command, point, nth, fault, kept, deep_llama, calib_file, uninterrupted, tmp_path, record_fault):
    source_before = tree_digest(deep_llama)
    out = tmp_path / "out"
    args = COMMANDS[command](deep_llama, calib_file, out)
    stopped = run_with_fault(args, point, nth, fault)
    assert_ended_as_expected(stopped, fault, kept)
    assert not out.exists(), "a stopped run left a folder that looks complete"
    assert (tmp_path / ".out.partial" / PROGRESS_FILE).is_file(), "the finished blocks were not kept"
    assert leftovers(tmp_path, "out") in ([], [".out.lock"]) if fault == "SIGKILL" else leftovers(tmp_path, "out") == []
    assert tree_digest(deep_llama) == source_before, "the source model was touched"
    resumed = run_plain([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_checkpoint(out, uninterrupted[command])
    assert not (tmp_path / ".out.partial").exists() and not (out / PROGRESS_FILE).exists()
    record_fault(command, f"{point} call {nth}", fault,
                 ["exit code" + ("" if fault == "SIGKILL" else " and one closing line naming what was kept"),
                  "no output folder", "finished blocks kept", "source unchanged",
                  "--resume gives the uninterrupted run's bytes"])
