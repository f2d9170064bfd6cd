"""Where vLLM's environment is found, and what is said where it is not."""

import pytest

from compress.backends import vllm_env
from compress.cli import main


def test_an_interrupted_setup_is_not_taken_for_vllm(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("COMPRESS_VLLM_PYTHON", raising=False)
    python = tmp_path / "vllm-venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    assert vllm_env.vllm_python() is None  # no completion mark: a setup that stopped half-way
    with pytest.raises(vllm_env.UserError, match="run `compress setup vllm` once"):
        vllm_env.require_vllm_python()
    (tmp_path / "vllm-venv" / vllm_env.COMPLETE_MARK).write_text("")
    assert vllm_env.vllm_python() == python
    monkeypatch.setenv("COMPRESS_VLLM_PYTHON", "/opt/other/python")
    assert str(vllm_env.vllm_python()) == "/opt/other/python"


def test_a_failed_setup_step_is_one_line_naming_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(vllm_env, "TORCH", "no-such-package-for-this-test==0")
    assert main(["setup", "vllm"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the steps it said as it went
    assert last.startswith("error: `") and "failed (exit 1): ERROR: No matching distribution found for " \
        "no-such-package-for-this-test==0" in last
    assert not (tmp_path / "vllm-venv" / vllm_env.COMPLETE_MARK).exists()
