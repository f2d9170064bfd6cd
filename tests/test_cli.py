"""`compress` on bad input: one line naming the problem and the fix, exit code 2, nothing left behind."""

import json
import subprocess
import sys

import pytest
import torch

from compress.cli import main
from compress.formats import packed_settings
from compress.models import resolve


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code, err, *words):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def quick(tmp_path, calib_file):
    return ["--calib", str(calib_file), "--nsamples", "4", "--seqlen", "32", "--no-progress", "--device", "cpu",
            "--out", str(tmp_path / "out" / "q")]


def test_unknown_alias(capsys, quick, tmp_path):
    code, _, err = run_cli(["quantize", "llama-9000"] + quick, capsys)
    assert_user_error(code, err, "unknown model 'llama-9000'", "compress models")
    assert leftovers(tmp_path / "out") == []


def test_missing_folder(capsys, quick, tmp_path):
    code, _, err = run_cli(["quantize", str(tmp_path / "nope")] + quick, capsys)
    assert_user_error(code, err, "does not exist")


def test_hub_alias_offline_names_the_fetch_command(capsys, quick):
    code, _, err = run_cli(["quantize", "llama-2-7b"] + quick, capsys)
    assert_user_error(code, err, "meta-llama/Llama-2-7b-hf", "huggingface-cli download")


def copy_tiny(tmp_path, arch="llama"):
    import shutil

    folder = tmp_path / f"copy-{arch}"
    shutil.copytree(resolve(f"tiny-{arch}").path, folder)
    return folder


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_corrupt_or_truncated_safetensors(capsys, quick, tmp_path, damage):
    folder = copy_tiny(tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 8)
    code, _, err = run_cli(["quantize", str(folder)] + quick, capsys)
    assert_user_error(code, err, "corrupt or truncated", "model.safetensors")
    assert leftovers(tmp_path / "out") == []


def test_pickle_only_weights_are_refused(capsys, quick, tmp_path):
    folder = copy_tiny(tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    code, _, err = run_cli(["quantize", str(folder)] + quick, capsys)
    assert_user_error(code, err, "no safetensors weights", "pickle")


@pytest.mark.parametrize("bits", ["5", "16", "1"])
def test_unsupported_bits(capsys, quick, bits):
    code, _, err = run_cli(["quantize", "tiny-llama", "--bits", bits] + quick, capsys)
    assert_user_error(code, err, f"unsupported bits {bits}")


@pytest.mark.parametrize("group", ["0", "-2"])
def test_bad_group_size(capsys, quick, group):
    code, _, err = run_cli(["quantize", "tiny-llama", "--group-size", group] + quick, capsys)
    assert_user_error(code, err, f"invalid group size {group}", "-1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(capsys, quick, tmp_path):
    code, _, err = run_cli(["quantize", "tiny-llama"] + quick + ["--device", "cuda"], capsys)
    assert_user_error(code, err, "no CUDA GPU", "--device cpu")
    assert leftovers(tmp_path / "out") == []


def test_existing_output_refused_unless_force(capsys, quick, tmp_path):
    out = tmp_path / "out" / "q"
    code, _, _ = run_cli(["quantize", "tiny-llama", "--method", "rtn"] + quick, capsys)
    assert code == 0
    code, _, err = run_cli(["quantize", "tiny-llama", "--method", "rtn"] + quick, capsys)
    assert_user_error(code, err, "already exists", "--force")
    code, stdout, _ = run_cli(["quantize", "tiny-llama", "--method", "rtn", "--force"] + quick, capsys)
    assert code == 0 and "saved" in stdout and (out / "config.json").is_file()
    assert leftovers(tmp_path / "out") == ["q"]  # no temporary folders left beside it
    # A file of the user's inside it: never replaced, --force or not.
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(["quantize", "tiny-llama", "--method", "rtn", "--force"] + quick, capsys)
    assert_user_error(code, err, "holds keep.txt, which this command did not write", "choose another --out")
    assert (out / "keep.txt").read_text() == "mine"


def test_remote_code_model_needs_opt_in(capsys, quick, tmp_path):
    folder = copy_tiny(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_custom_llm", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(["quantize", str(folder)] + quick, capsys)
    assert_user_error(code, err, "custom code", "--trust-remote-code")
    assert leftovers(tmp_path / "out") == []


def test_unknown_method(capsys, quick):
    code, _, err = run_cli(["quantize", "tiny-llama", "--method", "awq9"] + quick, capsys)
    assert_user_error(code, err, "unknown method 'awq9'", "gptq", "rtn")


def test_selection_matching_nothing(capsys, quick, tmp_path):
    code, _, err = run_cli(["quantize", "tiny-llama", "--include", "no_such_layer*"] + quick, capsys)
    assert_user_error(code, err, "no linear layer", "no_such_layer*")
    assert leftovers(tmp_path / "out") == []


def test_unknown_calibration_source(capsys, quick):
    code, _, err = run_cli(["quantize", "tiny-llama"] + quick + ["--calib", "pile"], capsys)
    assert_user_error(code, err, "unknown text source 'pile'")


def test_yaml_config_bad_key_and_type(capsys, quick, tmp_path):
    config = tmp_path / "q.yaml"
    config.write_text("bits: 4\ngroup_sise: 128\n")
    code, _, err = run_cli(["quantize", "tiny-llama", "--config", str(config)] + quick, capsys)
    assert_user_error(code, err, "unknown key 'group_sise'", "group_size")
    config.write_text("bits: four\n")
    code, _, err = run_cli(["quantize", "tiny-llama", "--config", str(config)] + quick, capsys)
    assert_user_error(code, err, "'bits'", "int")
    config.write_text("bits: [4\n")
    code, _, err = run_cli(["quantize", "tiny-llama", "--config", str(config)] + quick, capsys)
    assert_user_error(code, err, "not valid YAML")
    code, _, err = run_cli(["quantize", "tiny-llama", "--config", str(tmp_path / "none.yaml")] + quick, capsys)
    assert_user_error(code, err, "does not exist")


def test_yaml_config_values_used_and_cli_overrides(capsys, quick, tmp_path):
    config = tmp_path / "q.yaml"
    config.write_text("method: rtn\nbits: 8\ngroup_size: -1\n")
    code, stdout, _ = run_cli(["quantize", "tiny-llama", "--config", str(config), "--bits", "4"] + quick, capsys)
    assert code == 0
    settings = packed_settings(json.loads((tmp_path / "out" / "q" / "config.json").read_text())["quantization_config"])
    assert (settings.bits, settings.group_size, settings.method) == (4, -1, "rtn")


def test_summary_and_models_listing(capsys, quick):
    code, stdout, _ = run_cli(["quantize", "tiny-gpt_neox", "--bits", "4", "--group-size", "32"] + quick, capsys)
    assert code == 0
    assert "size" in stdout and "x smaller" in stdout and "saved" in stdout and "time" in stdout
    # The closing line names the engines that load the output, and its format.
    assert "loads  in vLLM, transformers (with compressed-tensors), compress bench (our loader) (compressed-tensors)" \
        in stdout
    code, stdout, _ = run_cli(["models"], capsys)
    assert code == 0
    for alias in ["llama-2-7b", "mistral-7b", "mpt-7b", "falcon-7b", "gpt-j-6b", "dolly-v2-3b", "opt-125m",
                  "bloom-560m", "smollm2-135m", "minilm-l6", "tiny-bert"]:
        assert alias in stdout


def test_console_script_exit_code(tmp_path):
    """The installed entry point maps errors to exit code 2 as well (a real process, no traceback)."""
    proc = subprocess.run([sys.executable, "-m", "compress.cli", "quantize", "no-such-model"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown model 'no-such-model'" in proc.stderr


# --- bench / report / sweep --------------------------------------------------------------------------


def test_bench_cuda_without_a_gpu(capsys, eval_file):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = run_cli(["bench", "tiny-llama", "--device", "cuda", "--eval", str(eval_file)], capsys)
    assert_user_error(code, err, "--device cuda", "no CUDA GPU")


def test_bench_empty_evaluation_text(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run_cli(["bench", "tiny-llama", "--device", "cpu", "--eval", str(empty)], capsys)
    assert_user_error(code, err, "empty")


def test_bench_unknown_transform(capsys, eval_file):
    code, _, err = run_cli(["bench", "tiny-llama", "--device", "cpu", "--eval", str(eval_file), "--seqlen", "32",
                            "--windows", "1", "--no-speed", "--no-progress", "--transform", "magic"], capsys)
    assert_user_error(code, err, "unknown transform 'magic'")


def test_report_of_another_schema_version(capsys, tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema": "compress-workbench/bench", "schema_version": 0}))
    code, _, err = run_cli(["report", str(old), "--out", str(tmp_path / "rep")], capsys)
    assert_user_error(code, err, "schema version 0")
    assert not (tmp_path / "rep").exists()


def test_report_of_a_missing_file(capsys, tmp_path):
    code, _, err = run_cli(["report", str(tmp_path / "nope.json"), "--out", str(tmp_path / "rep")], capsys)
    assert_user_error(code, err, "does not exist")


def test_sweep_with_a_bad_key(capsys, tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("model: tiny-llama\nmethod: [gptq]\n")
    code, _, err = run_cli(["sweep", str(cfg)], capsys)
    assert_user_error(code, err, "unknown key 'method'")


def test_bench_a_folder_without_a_tokenizer(capsys, tmp_path, eval_file):
    import shutil

    folder = tmp_path / "bare"
    folder.mkdir()
    source = resolve("tiny-llama").path
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(source / name, folder / name)
    code, _, err = run_cli(["bench", str(folder), "--device", "cpu", "--eval", str(eval_file)], capsys)
    assert_user_error(code, err, "has no tokenizer")


def test_bnb_with_unsupported_bits(capsys, quick, tmp_path):
    code, _, err = run_cli(["quantize", "tiny-llama", "--method", "bnb", "--bits", "2"] + quick, capsys)
    assert_user_error(code, err, "8 or 4 bits, not 2", "--bits 8")
    assert leftovers(tmp_path / "out") == []


def test_a_backend_that_cannot_run_the_checkpoint(capsys, quick, tmp_path):
    code, _, _ = run_cli(["quantize", "tiny-llama", "--method", "rtn", "--bits", "3", "--group-size", "32"] + quick,
                         capsys)
    assert code == 0
    code, _, err = run_cli(["bench", str(tmp_path / "out" / "q"), "--backend", "torch", "--no-progress",
                            "--windows", "1", "--seqlen", "16", "--no-speed"], capsys)
    assert_user_error(code, err, "backend 'torch' cannot run this checkpoint", "3-bit")


STARTUP_PROBE = """
import sys
from compress.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "transformers", "safetensors") if m in sys.modules)
print("HEAVY", ",".join(heavy))
sys.exit(code)
"""


@pytest.mark.parametrize("argv, code", [
    (["quantize", "llama-9000"], 2),
    (["quantize", "tiny-llama", "--method", "nope"], 2),
    (["prune", "./no/such/folder"], 2),
    (["bench", "llama-9000"], 2),
    (["bench", "tiny-llama", "--base", "llama-9000"], 2),
    (["export-onnx", "llama-9000"], 2),
    (["export-gguf", "tiny-llama", "--method", "nope"], 2),
    (["models"], 0),
])
def test_user_errors_answer_before_heavy_imports(argv, code):
    # A one-line answer must not pay for importing torch and transformers (seconds on a small machine).
    done = subprocess.run([sys.executable, "-c", STARTUP_PROBE, *argv], capture_output=True, text=True)
    assert done.returncode == code, done.stderr
    assert "HEAVY \n" in done.stdout, done.stdout
    if code:
        assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
