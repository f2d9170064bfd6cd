"""The same command and seed give the same bytes: every output tensor's SHA-256 is equal across two runs of each
method, and across torch thread counts on these shapes (the manifest records the threads, device and library
versions, what could change a data-driven method's last bits at larger shapes)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from compress.cli import main


def tensor_digests(folder) -> dict[str, str]:
    digests = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            digests[name] = hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    assert digests, f"no tensors in {folder}"
    return digests


COMMANDS = {
    "rtn": ["quantize", "tiny-llama", "--method", "rtn", "--group-size", "32"],
    "gptq": ["quantize", "tiny-llama", "--method", "gptq", "--group-size", "32"],
    "awq": ["quantize", "tiny-llama", "--method", "awq", "--group-size", "32"],
    "wanda": ["prune", "tiny-llama", "--method", "wanda"],
    "sparsegpt": ["prune", "tiny-llama", "--method", "sparsegpt"],
    "magnitude-2:4": ["prune", "tiny-llama", "--method", "magnitude", "--pattern", "2:4"],
}


@pytest.mark.parametrize("method", list(COMMANDS))
def test_two_runs_give_identical_tensors_at_any_thread_count(method, calib_file, tmp_path):
    args = [*COMMANDS[method], "--calib", str(calib_file), "--nsamples", "8", "--seqlen", "64", "--device", "cpu",
            "--no-progress"]
    threads = torch.get_num_threads()
    digests = []
    try:
        for run, count in enumerate((2, 2, 1)):
            torch.set_num_threads(count)
            assert main([*args, "--out", str(tmp_path / str(run))]) == 0
            digests.append(tensor_digests(tmp_path / str(run)))
    finally:
        torch.set_num_threads(threads)
    assert digests[0] == digests[1], "two identical runs differ"
    assert digests[0] == digests[2], "one thread and two threads differ"
    manifest = json.loads((tmp_path / "0" / "compress_manifest.json").read_text())
    environment = manifest["environment"]
    assert environment["torch_threads"] == 2 and environment["torch"] and environment["transformers"]
    assert manifest["device"] == "cpu"


def test_two_distillations_give_identical_students(calib_file, tmp_path):
    from distill.config import config_from_dict
    from distill.run import run
    from tests.distill.test_run import BASE

    students = []
    for name in ("a", "b"):
        config = config_from_dict(json.loads(json.dumps(BASE)) | {
            "data": str(calib_file), "eval": str(calib_file), "out": str(tmp_path / name)})
        run(config)
        students.append(tensor_digests(tmp_path / name))
    assert students[0] == students[1]
