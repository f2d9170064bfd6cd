"""Interrupted streaming runs: what finished is kept, --resume continues at the next block and writes the
bytes an uninterrupted run writes, also after a SIGKILL and with activations spilled to files."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.api import QuantizeRequest, quantize
from compress.cli import main
from compress.errors import UserError
from compress.output import PROGRESS_FILE, PartialOutput
from compress.prune.run import PruneRequest, prune
from tests.conftest import assert_same_checkpoint

LAYERS = 5


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    """A tiny Llama with 5 blocks, so a run can stop in the middle."""
    from transformers import AutoModelForCausalLM

    from compress.tiny import tiny_config, tiny_tokenizer

    config = tiny_config("llama")
    config.num_hidden_layers = LAYERS
    folder = tmp_path_factory.mktemp("deep") / "llama5"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def settings(model, out, calib_file, **kw):
    values = dict(model=str(model), method="gptq", bits=4, group_size=32, calib=str(calib_file), nsamples=8,
                  seqlen=64, out=str(out), progress=False, device="cpu", checkpoint_every=0)
    values.update(kw)
    return values


def stop_after_block(monkeypatch, block: int):
    """Interrupt the run (Ctrl-C) right after block ``block`` was checkpointed."""
    real = PartialOutput.checkpoint

    def checkpoint(self, next_block, *args, **kwargs):
        real(self, next_block, *args, **kwargs)
        if next_block == block + 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(PartialOutput, "checkpoint", checkpoint)


@pytest.mark.parametrize("budget", [2 << 30, 0])  # activations carried in memory / spilled to files
def test_resumed_quantize_equals_an_uninterrupted_run(deep_llama, tmp_path, calib_file, monkeypatch, budget):
    whole = quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "whole", calib_file, activation_budget=budget,
                                                lm_head_bits=8)))
    target = tmp_path / "cut"
    with monkeypatch.context() as patch:
        stop_after_block(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            quantize(QuantizeRequest(**settings(deep_llama, target, calib_file, activation_budget=budget,
                                                lm_head_bits=8)))
    partial = tmp_path / ".cut.partial"
    assert not target.exists() and (partial / PROGRESS_FILE).is_file()
    assert json.loads((partial / PROGRESS_FILE).read_text())["next_block"] == 3
    # Without --resume the kept blocks are not thrown away silently.
    with pytest.raises(UserError, match="pass --resume to continue it, or --force"):
        quantize(QuantizeRequest(**settings(deep_llama, target, calib_file, activation_budget=budget, lm_head_bits=8)))
    resumed = quantize(QuantizeRequest(**settings(deep_llama, target, calib_file, activation_budget=budget,
                                                  lm_head_bits=8, resume=True)))
    assert resumed.manifest["resumed_at_block"] == 3 and whole.manifest["resumed_at_block"] is None
    saved = lambda result: json.loads((result.folder / "compress_manifest.json").read_text())  # noqa: E731
    assert saved(resumed)["layers"] == saved(whole)["layers"] and len(saved(whole)["layers"]) == 7 * LAYERS
    assert saved(resumed)["lm_head"] == saved(whole)["lm_head"]
    assert_same_checkpoint(resumed.folder, whole.folder)
    assert not partial.exists()


def test_resumed_prune_with_sharded_output_equals_an_uninterrupted_run(deep_llama, tmp_path, calib_file, monkeypatch):
    common = dict(method="sparsegpt", pattern="2:4", max_shard_bytes=60_000)
    whole = prune(PruneRequest(**settings(deep_llama, tmp_path / "whole", calib_file, **common)))
    assert len(list(whole.folder.glob("model-*-of-*.safetensors"))) > 2
    with monkeypatch.context() as patch:
        stop_after_block(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            prune(PruneRequest(**settings(deep_llama, tmp_path / "cut", calib_file, **common)))
    resumed = prune(PruneRequest(**settings(deep_llama, tmp_path / "cut", calib_file, resume=True, **common)))
    assert resumed.manifest["resumed_at_block"] == 2
    assert_same_checkpoint(resumed.folder, whole.folder)


def test_a_killed_run_resumes_to_the_same_bytes(deep_llama, tmp_path, calib_file):
    """SIGKILL after block 1: no handler runs, the folder is as the kill left it."""
    args = ["quantize", str(deep_llama), "--method", "rtn", "--bits", "4", "--group-size", "32", "--device", "cpu",
            "--no-progress", "--checkpoint-every", "0", "--max-shard-size", "50KB"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    script = (
        "import os, signal, sys\n"
        "from compress.output import PartialOutput\n"
        "real = PartialOutput.checkpoint\n"
        "def checkpoint(self, next_block, *a, **k):\n"
        "    real(self, next_block, *a, **k)\n"
        "    if next_block == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "PartialOutput.checkpoint = checkpoint\n"
        "from compress.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    killed = subprocess.run([sys.executable, "-c", script, *args, "--out", str(tmp_path / "cut")],
                            capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "cut").exists() and (tmp_path / ".cut.partial" / PROGRESS_FILE).is_file()
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert_same_checkpoint(tmp_path / "cut", tmp_path / "whole")


def test_resume_refuses_a_partial_run_with_other_settings(deep_llama, tmp_path, calib_file, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        stop_after_block(patch, 0)
        with pytest.raises(KeyboardInterrupt):
            quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "q", calib_file)))
    assert f"1 block(s) are written and kept in {tmp_path / '.q.partial'}" in capsys.readouterr().err
    with pytest.raises(UserError, match="other settings or another source model"):
        quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "q", calib_file, bits=3, resume=True)))
    # --force starts again; --resume with nothing to resume starts at the first block.
    quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "q", calib_file, bits=3, force=True)))
    fresh = quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "r", calib_file, resume=True)))
    assert fresh.manifest["resumed_at_block"] is None


def test_a_run_interrupted_before_its_first_block_leaves_nothing(deep_llama, tmp_path, calib_file, monkeypatch):
    with monkeypatch.context() as patch:
        stop_after_block(patch, -1)  # never fires: interrupt inside block 0 instead
        from compress.quant import gptq

        patch.setattr(gptq, "gptq_quantize", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            quantize(QuantizeRequest(**settings(deep_llama, tmp_path / "q", calib_file)))
    assert list(tmp_path.iterdir()) == []


def test_resume_is_for_streaming_runs(tmp_path, calib_file):
    with pytest.raises(UserError, match="--resume continues a streaming run"):
        quantize(QuantizeRequest(**settings("tiny-llama", tmp_path / "q", calib_file, in_memory=True, resume=True)))
