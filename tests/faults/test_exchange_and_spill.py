"""Faults at the seams between commands and at the disk's limit: a run killed between the two renames of its
exchange is settled by the next run of any other command on the same --out (the earlier output is put back, never
orphaned in a hidden folder), and a full disk while activations spill to files ends in the disk-full line, keeps
only what --resume needs, and resumes to the uninterrupted run's bytes."""

from __future__ import annotations

import pytest

from compress.output import PROGRESS_FILE
from tests.conftest import assert_same_checkpoint
from tests.faults.harness import assert_ended_as_expected, run_plain, run_with_fault, tree_digest

PUT_IN_PLACE = "compress.output:_put_in_place"  # the exchange's second rename: the earlier output is moved aside
COMMON = ["--device", "cpu", "--no-progress"]


def quantize(model, out, *extra):
    return ["quantize", str(model), "--method", "rtn", "--bits", "4", "--group-size", "32", *COMMON, "--out",
            str(out), *extra]


def prune(model, out, *extra):
    return ["prune", str(model), "--method", "magnitude", "--sparsity", "0.5", *COMMON, "--out", str(out), *extra]


def export_onnx(model, out, *extra):
    return ["export-onnx", str(model), "--out", str(out), *extra]


KINDS = {"quantize": quantize, "prune": prune, "export-onnx": export_onnx}
# (the command killed mid-exchange, the other kind of command run next on the same --out)
PAIRS = [("prune", "export-onnx"), ("export-onnx", "quantize")]


@pytest.mark.parametrize("killed, then", PAIRS, ids=[f"{k}-then-{t}" for k, t in PAIRS])
def test_a_kill_mid_exchange_is_settled_by_another_kind_of_command(killed, then, deep_llama, tmp_path,
                                                                     record_fault):
    out = tmp_path / "out"
    assert run_plain(quantize(deep_llama, out)).returncode == 0  # the earlier output, ours
    earlier = tree_digest(out)
    stopped = run_with_fault(KINDS[killed](deep_llama, out, "--force"), PUT_IN_PLACE, 1, "SIGKILL")
    assert_ended_as_expected(stopped, "SIGKILL", None)
    assert not out.exists() and (tmp_path / ".out.old").is_dir()  # killed between the renames
    nxt = run_plain(KINDS[then](deep_llama, out))  # no --force: the put-back output is refused as existing
    assert nxt.returncode == 2, nxt.stderr
    assert nxt.lines[-1] == f"error: output folder {out} already exists: choose another --out or pass --force to replace it"
    assert tree_digest(out) == earlier, "the earlier output was not put back intact"
    assert not (tmp_path / ".out.old").exists()
    assert run_plain(KINDS[then](deep_llama, out, "--force")).returncode == 0  # and --force replaces it, as ours
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "something was left in a hidden folder"
    record_fault(then, f"{killed} SIGKILLed between the two renames of its exchange", "SIGKILL",
                 ["the next run of another command puts the earlier output back byte for byte",
                  "it then refuses it without --force and replaces it with --force", "nothing left hidden"])


SPILL_WRITE = "compress.activations:Activations._write"


@pytest.fixture(scope="module")
def whole_spilled(deep_llama, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("spill") / "whole"
    done = run_plain(gptq_spilling(deep_llama, calib_file, out))
    assert done.returncode == 0, done.stderr
    return out


def gptq_spilling(model, calib_file, out):
    return ["quantize", str(model), "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib",
            str(calib_file), "--nsamples", "8", "--seqlen", "64", *COMMON, "--checkpoint-every", "0",
            "--activation-budget", "0", "--out", str(out)]


@pytest.mark.parametrize("nth, when", [(1, "capture"), (30, "blocks")])
def test_a_full_disk_while_spilling_activations(nth, when, deep_llama, calib_file, whole_spilled, tmp_path,
                                                record_fault):
    """Budget 0: every window's states go to files. The disk fills while the first block's inputs are captured
    (not 'the model cannot be traced') or while block 2's are written (kept: the blocks and the recorded states,
    not the spill)."""
    out = tmp_path / "out"
    args = gptq_spilling(deep_llama, calib_file, out)
    stopped = run_with_fault(args, SPILL_WRITE, nth, "ENOSPC")
    assert_ended_as_expected(stopped, "ENOSPC", None if when == "capture" else "block(s) are written and kept")
    assert "could not be traced" not in stopped.stderr
    partial = tmp_path / ".out.partial"
    if when == "capture":
        assert not partial.exists() and not out.exists()
    else:
        assert (partial / PROGRESS_FILE).is_file()
        assert [p.name for p in (partial / "activations").iterdir()] != [] and not (
            partial / "activations" / "spill").exists(), "the spilled sets were kept beside the recorded states"
        kept = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file())
        assert "kB)" in stopped.lines[-1] or "MB)" in stopped.lines[-1], stopped.lines[-1]
        assert kept > 0
    resumed = run_plain([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_checkpoint(out, whole_spilled)
    record_fault("quantize", f"{SPILL_WRITE} call {nth} (during the {when})", "ENOSPC",
                 ["exit code 2 and the disk-full line (not an untraceable model)",
                  "nothing kept" if when == "capture" else "only the blocks and the recorded states kept, with their size",
                  "--resume gives the uninterrupted run's bytes"])
