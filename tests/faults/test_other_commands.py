"""export-onnx, sweep and distill under faults: SIGKILL and SIGTERM during the save, between sweep rows and
during training. Nothing that looks complete is left, the source is never touched, and the same command (with
--resume for distill) afterwards produces what an uninterrupted run produces."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from tests.conftest import assert_same_checkpoint
from tests.faults.harness import assert_ended_as_expected, run_plain, run_with_fault, tree_digest


def file_digests(folder):
    """Every file's SHA-256, the manifest's (which holds timings and the folder's path) excepted."""
    assert (folder / "compress_manifest.json").is_file()
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "compress_manifest.json"}


@pytest.fixture(scope="module")
def tiny_llama_folder():
    from compress.models import resolve

    return resolve("tiny-llama").path


@pytest.fixture(scope="module")
def whole_onnx(tiny_llama_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "whole"
    done = run_plain(["export-onnx", str(tiny_llama_folder), "--out", str(out)])
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGTERM"])
def test_export_onnx_stopped_while_saving(fault, tiny_llama_folder, whole_onnx, tmp_path, record_fault):
    source_before = tree_digest(tiny_llama_folder)
    out = tmp_path / "out"
    args = ["export-onnx", str(tiny_llama_folder), "--out", str(out)]
    stopped = run_with_fault(args, "onnx:save", 1, fault)
    assert_ended_as_expected(stopped, fault, "nothing was written", alone=False)  # the exporter's own warnings
    assert not out.exists()
    assert tree_digest(tiny_llama_folder) == source_before
    again = run_plain(args)  # no --force needed: nothing that looks complete was left
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "a killed run's temporary folder was not cleared"
    assert file_digests(out) == file_digests(whole_onnx)
    record_fault("export-onnx", "onnx.save call 1", fault,
                 ["exit code" + ("" if fault == "SIGKILL" else " and one closing line"), "no output folder",
                  "source unchanged", "the same command then clears the killed run's temporary folder and writes "
                  "the uninterrupted export's bytes"])


def sweep_config(tmp_path, calib_file, eval_file):
    values = dict(model="tiny-llama", name="t", runs=str(tmp_path / "runs"), report=str(tmp_path / "report"),
                  device="cpu", dtypes=["float32"], methods=["rtn", "gptq"], bits=[4], group_sizes=[32], peers=[],
                  calib=str(calib_file), nsamples=4, calib_seqlen=32, eval=str(eval_file), seqlen=32, windows=3,
                  decode_tokens=2, decode_batches=[1], repeats=1, isolate=False, progress=True)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def accuracy_of(results):
    return {p.name: json.loads(p.read_text())["accuracy"]["perplexity"] for p in sorted(results.glob("*.json"))}


@pytest.fixture(scope="module")
def whole_sweep(calib_file, eval_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    done = run_plain(["sweep", str(sweep_config(folder, calib_file, eval_file))], cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder / "runs" / "t"


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGTERM"])
def test_sweep_stopped_between_rows_continues_where_it_stopped(fault, calib_file, eval_file, whole_sweep, tmp_path,
                                                               record_fault):
    config = sweep_config(tmp_path, calib_file, eval_file)
    root = tmp_path / "runs" / "t"
    stopped = run_with_fault(["sweep", str(config)], "compress.sweep:run_variant", 2, fault, cwd=tmp_path)
    assert stopped.returncode == (-9 if fault == "SIGKILL" else 143), stopped.stderr[-2000:]
    if fault == "SIGTERM":
        assert stopped.lines[-1] == (f"terminated (SIGTERM): 2 of 2 checkpoints and 1 of 3 benchmark results are "
                                     f"kept in {root}: run the same command again to continue from there")
    assert not (tmp_path / "report").exists()
    finished = {p.name: p.read_bytes() for p in (root / "results").glob("*.json")}
    assert len(finished) == 1
    again = run_plain(["sweep", str(config)], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "reusing" in again.stderr and (tmp_path / "report" / "README.md").is_file()
    for name, data in finished.items():  # the finished row was not measured again
        assert (root / "results" / name).read_bytes() == data
    assert accuracy_of(root / "results") == accuracy_of(whole_sweep / "results")
    for model in (whole_sweep / "models").iterdir():
        assert_same_checkpoint(root / "models" / model.name, model)  # tensors and config; manifests hold timings
    record_fault("sweep", "compress.sweep.run_variant call 2 (between rows)", fault,
                 ["exit code" + ("" if fault == "SIGKILL" else " and one closing line counting what was kept"),
                  "no report", "the rerun reuses the finished row unchanged", "checkpoints and perplexities equal "
                  "an uninterrupted sweep's"])


DISTILL = {
    "teacher": "tiny-llama", "seqlen": 16, "max_examples": 24, "eval_windows": 2, "eval_seqlen": 32,
    "checkpoint_every": 2, "progress": False, "student": {"layers": 1},
    "stages": [{"kind": "intermediate", "max_steps": 5, "batch_size": 4, "lr": 1e-3},
               {"kind": "prediction", "max_steps": 3, "batch_size": 4, "lr": 1e-3}],
}


def distill_config(folder, calib_file):
    path = folder / "distill.yaml"
    path.write_text(yaml.safe_dump(DISTILL | {"data": str(calib_file), "eval": str(calib_file),
                                              "out": str(folder / "student")}))
    return path


@pytest.fixture(scope="module")
def whole_student(calib_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("distill")
    done = run_plain(["run", str(distill_config(folder, calib_file))], entry="distill.cli")
    assert done.returncode == 0, done.stderr
    return folder / "student"


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGTERM"])
def test_distill_stopped_while_training_resumes_to_the_same_student(fault, calib_file, whole_student, tmp_path,
                                                                     record_fault):
    config = distill_config(tmp_path, calib_file)
    stopped = run_with_fault(["run", str(config)], "distill.checkpoint:save_checkpoint", 2, fault,
                             entry="distill.cli")
    assert_ended_as_expected(stopped, fault, "checkpoints are kept in")
    assert not (tmp_path / "student").exists()
    again = run_plain(["run", str(config), "--resume"], entry="distill.cli")
    assert again.returncode == 0, again.stderr
    assert tree_digest(tmp_path / "student")["model.safetensors"] == tree_digest(whole_student)["model.safetensors"]
    record_fault("distill", "distill.checkpoint.save_checkpoint call 2", fault,
                 ["exit code" + ("" if fault == "SIGKILL" else " and one closing line naming the checkpoints"),
                  "no student folder", "--resume gives the uninterrupted student's weights, byte for byte"])
