"""A recipe stopped during its distill stage: the rerun with --resume redoes no finished stage and ends with the
model an uninterrupted run makes."""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_checkpoint
from tests.faults.harness import assert_ended_as_expected, run_plain, run_with_fault, tree_digest
from tests.recipe.test_run import recipe, write


def stages_of(root):
    """Finished stage outputs by kind (hidden names are a stage's work in progress: checkpoints, partial folders)."""
    return {p.name.split("-")[1]: p for p in sorted((root / "runs" / "tiny" / "stages").iterdir())
            if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, calib_file, eval_file):
    tmp_path = tmp_path_factory.mktemp("recipe-whole")
    done = run_plain(["recipe", "run", str(write(tmp_path, recipe(tmp_path, calib_file, eval_file)))])
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGTERM"])
def test_a_recipe_stopped_while_distilling_resumes_without_redoing_a_stage(fault, uninterrupted, calib_file,
                                                                          eval_file, tmp_path, record_fault):
    path = write(tmp_path, recipe(tmp_path, calib_file, eval_file))
    stopped = run_with_fault(["recipe", "run", str(path)], "distill.checkpoint:save_checkpoint", 2, fault)
    assert_ended_as_expected(stopped, fault, "1 of 3 stages are finished")
    assert list(stages_of(tmp_path)) == ["prune"]  # the distill stage left no output that looks finished
    pruned = stages_of(tmp_path)["prune"]
    pruned_before = (pruned.stat().st_ino, tree_digest(pruned))
    again = run_plain(["recipe", "run", str(write(tmp_path, recipe(tmp_path, calib_file, eval_file, progress=True))),
                       "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(prune): reusing" in again.stderr and "resuming stage 1 at step" in again.stderr
    assert (pruned.stat().st_ino, tree_digest(pruned)) == pruned_before
    ours, theirs = stages_of(tmp_path), stages_of(uninterrupted)
    assert [p.name for p in ours.values()] == [p.name for p in theirs.values()]  # the same fingerprints
    assert_same_checkpoint(ours["w4"], theirs["w4"])
    assert (ours["distill"] / "model.safetensors").read_bytes() == \
        (theirs["distill"] / "model.safetensors").read_bytes()
    record_fault("recipe", "distill.checkpoint.save_checkpoint call 2 (its distill stage)", fault,
                 ["exit code" + ("" if fault == "SIGKILL" else " and one closing line counting the finished stages"),
                  "no distill output", "--resume reuses the pruned stage untouched and resumes the distillation",
                  "the final W4 checkpoint equals an uninterrupted recipe's, byte for byte"])
