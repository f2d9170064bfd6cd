"""The ONNX exports give the same logits on CPUs without VNNI as on this one.

ONNX Runtime picks its integer kernels by instruction set, and the u8 x s8 path of CPUs without VNNI
saturates (compress/ort/build.py, INT8_FORMAT). CI's machines have VNNI, so these tests run the same
file through onnxruntime on emulated CPUs (qemu-user: an AVX2 Haswell with neither AVX-512 nor VNNI,
and an AVX Sandy Bridge, whose integer kernels are SSE4.1's) and compare with the logits computed natively. A probe first checks that the
emulated CPU really takes the saturating path, so a pass is not the emulator passing VNNI through."""

from __future__ import annotations

import importlib.util
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

QEMU = shutil.which("qemu-x86_64")
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed"),
    pytest.mark.skipif(platform.machine() != "x86_64" or QEMU is None,
                       reason="needs an x86-64 host with qemu-user (apt-get install qemu-user) to emulate other CPUs"),
]
PROBE = Path(__file__).with_name("ort_logits.py")
EMULATED = {"AVX2 without VNNI": "Haswell-v4", "AVX without AVX2": "SandyBridge-v2"}


def ort_logits(source: str, ids: np.ndarray, tmp: Path, cpu: str | None = None) -> np.ndarray:
    """onnxruntime's output on this CPU (cpu None) or on the named emulated one."""
    np.save(tmp / "ids.npy", ids)
    command = [sys.executable, str(PROBE), source, str(tmp / "ids.npy"), str(tmp / "out.npy")]
    done = subprocess.run([QEMU, "-cpu", cpu, *command] if cpu else command, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return np.load(tmp / "out.npy")


def test_emulated_avx2_cpu_takes_the_saturating_path(tmp_path):
    """255 x 127 summed in pairs overflows 16 bits: exact on this VNNI CPU, saturated on the emulated
    AVX2 one (vpmaddubsw). Without this difference the tests below would prove nothing."""
    exact = 64 * 255 * 127
    assert ort_logits("--saturation", np.zeros(1), tmp_path)[0, 0] == exact
    assert ort_logits("--saturation", np.zeros(1), tmp_path, EMULATED["AVX2 without VNNI"])[0, 0] < exact


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    """name -> (exported folder, the PyTorch logits of what it was exported from on IDS)."""
    from compress.api import QuantizeRequest, quantize
    from compress.bench.load import load_for_bench
    from compress.ort.build import OnnxExportRequest, export_onnx

    def reference(model: str, **options) -> np.ndarray:
        with torch.no_grad():
            return load_for_bench(model, "float32", torch.device("cpu"), **options).model(IDS).logits.numpy()

    root = tmp_path_factory.mktemp("isa")
    export_onnx(OnnxExportRequest(model="tiny-llama", weights="int8", out=str(root / "int8")))
    made = {"int8": (root / "int8", reference("tiny-llama"))}
    for bits, group in ((8, -1), (4, 32)):
        q = quantize(QuantizeRequest(model="tiny-llama", method="rtn", bits=bits, group_size=group, lm_head_bits=8,
                                     out=str(root / f"q{bits}"), device="cpu", progress=False))
        export_onnx(OnnxExportRequest(model=str(q.folder), out=str(root / f"packed{bits}"), accuracy_level=4))
        made[f"packed{bits}"] = (root / f"packed{bits}", reference(str(q.folder), backend="dequant"))
    return made


IDS = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cpu", list(EMULATED))
def test_int8_export_gives_the_same_logits_without_vnni(cpu, exports, tmp_path):
    """uint8 weights: the integer sums are exact on every path, so the logits differ only by float
    rounding (1e-4 of their scale), where the saturating u8 x s8 format was off by 0.3 of it on AVX2."""
    folder, _ = exports["int8"]
    native = ort_logits(str(folder), IDS.numpy(), tmp_path)
    emulated = ort_logits(str(folder), IDS.numpy(), tmp_path, EMULATED[cpu])
    assert np.abs(emulated - native).max() <= 1e-4 * np.abs(native).max()


@pytest.mark.parametrize("cpu", [None, *EMULATED])
@pytest.mark.parametrize("export", ["packed8", "packed4"])
def test_packed_export_is_within_its_bound_on_every_path(export, cpu, exports, tmp_path):
    """MatMulNBits at accuracy_level 4 quantizes activations to int8 per block where the CPU has an int8
    path (AVX2 and up) and computes in float where it does not (AVX): the logits differ by about 1% of
    their scale between the two, so the bound is the worst path's: within 0.05 of the PyTorch logits
    of the same codes, as tests/ort/test_export.py states it."""
    folder, expected = exports[export]
    got = ort_logits(str(folder), IDS.numpy(), tmp_path, EMULATED.get(cpu))
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()
