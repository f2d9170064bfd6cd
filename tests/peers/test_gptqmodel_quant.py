"""GPTQModel as a sweep peer: the folder it writes is complete, wherever the caller's paths point."""

import os

import pytest

pytest.importorskip("gptqmodel")

from compress.checkpoint import load_quantized  # noqa: E402
from compress.models import resolve  # noqa: E402
from compress.peers.gptqmodel_quant import quantize_with_gptqmodel  # noqa: E402
from tests.conftest import calibration_ids  # noqa: E402


def test_a_relative_output_folder_receives_the_whole_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = resolve("tiny-llama").path
    out = quantize_with_gptqmodel(source, 4, 32, True, 0.01, calibration_ids(8, 32), os.path.join("runs", "gm"))
    folder = tmp_path / out
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    assert (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no logs/ or stray folders left in the cwd
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["gm"]
    model, _ = load_quantized(folder)
    assert model.model.layers[0].self_attn.q_proj.bits == 4
