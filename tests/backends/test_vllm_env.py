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


def test_the_environment_asks_linux_for_amx_state_in_every_process(tmp_path):
    """vLLM's CPU attention runs AMX instructions without asking for the AMX state: the hook asks at every start of
    the environment's python (a .pth file), and is harmless where there is no AMX."""
    import subprocess
    import sys
    import venv

    folder = tmp_path / "env"
    venv.create(folder, with_pip=False)
    python = folder / "bin" / "python"
    vllm_env.install_amx_hook(python)
    probe = ("import sys, ctypes; libc = ctypes.CDLL(None); state = ctypes.c_ulong(0); "
             # ARCH_GET_XCOMP_PERM (0x1022): the granted features; bit 18 is AMX's tile data
             "ok = libc.syscall(158, 0x1022, ctypes.byref(state)) == 0; "
             "print('compress_amx_permission' in sys.modules, ok and bool(state.value & (1 << 18)))")
    loaded, granted = subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
                                     check=True).stdout.split()
    assert loaded == "True"
    from compress.cpu_features import cpu_features

    assert granted == str("amx_tile" in cpu_features().features and sys.platform == "linux")
