"""The CPU instruction sets that pick kernels, as one comparable label.

Integer kernels take different paths by instruction set: ONNX Runtime's u8 x s8 MatMulInteger runs on
VNNI's ``vpdpbusd`` where the CPU has it and on ``vpmaddubsw`` (16-bit intermediate sums, which
saturate) where it does not; torch's int4/int8 CPU kernels and oneDNN pick AVX-512, AVX2, AMX or NEON
paths. A speed figure, and for some kernels an accuracy figure, belongs to the instruction set it ran
on, so every bench result records it and a report warns when rows compared side by side differ.

The features are the operating system's view (Linux ``/proc/cpuinfo``, macOS ``sysctl``); torch's own
CPUID-based choice (``torch.backends.cpu.get_cpu_capability()``) is recorded beside it, because an
environment variable (``ATEN_CPU_CAPABILITY``) or an emulator can make the two differ.
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import asdict, dataclass, field

# The features that choose kernels, by the names Linux gives them. x86: vector width (AVX2, AVX-512),
# 8-bit dot products (VNNI in its AVX-512 and AVX forms), bf16 and AMX tiles. ARM: NEON (asimd), 8-bit
# dot products (asimddp), int8 matrix multiply (i8mm), SVE and bf16.
X86_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
                "amx_tile", "amx_int8", "amx_bf16", "amx_fp16")
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "sve", "sve2", "bf16", "asimdhp")
# macOS names its features differently; these are the ones with a Linux counterpart above.
MACOS_SYSCTL = {"hw.optional.neon": "asimd", "hw.optional.arm.FEAT_DotProd": "asimddp",
                "hw.optional.arm.FEAT_I8MM": "i8mm", "hw.optional.arm.FEAT_BF16": "bf16",
                "hw.optional.neon_fp16": "asimdhp", "hw.optional.avx2_0": "avx2", "hw.optional.fma": "fma",
                "hw.optional.avx512f": "avx512f", "hw.optional.avx512bw": "avx512bw",
                "hw.optional.avx512vl": "avx512vl", "hw.optional.avx512vnni": "avx512_vnni"}


@dataclass(frozen=True)
class CpuFeatures:
    arch: str
    """platform.machine(): x86_64, aarch64, arm64, ..."""
    model: str
    features: tuple[str, ...]
    """The kernel-picking features this CPU reports (a subset of X86_FEATURES / ARM_FEATURES)."""
    source: str
    """Where ``features`` came from: /proc/cpuinfo, sysctl, or unknown."""
    torch_capability: str | None = None
    """The vector ISA torch's ATen kernels were dispatched to (AVX512, AVX2, DEFAULT, SVE256, ...)."""
    isa: str = field(init=False)
    """One label for comparing results: e.g. 'x86-64 AVX-512 VNNI', 'x86-64 AVX2', 'arm64 NEON dotprod i8mm'."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "isa", isa_label(self.arch, set(self.features)))

    def to_dict(self) -> dict:
        return asdict(self) | {"features": list(self.features)}


def isa_label(arch: str, features: set[str]) -> str:
    """The kernel-picking part of a feature set, in words. Two results with the same label took the
    same integer-kernel paths in ONNX Runtime, torch and llama.cpp as far as the instruction set decides."""
    if arch in ("x86_64", "AMD64", "amd64", "i386", "i686", "x86"):
        if {"avx512f", "avx512bw"} <= features:
            parts = ["AVX-512"]
        elif "avx2" in features:
            parts = ["AVX2"]
        else:
            parts = ["SSE"]
        if "avx512_vnni" in features or "avx_vnni" in features:
            parts.append("VNNI")
        if "amx_int8" in features or "amx_tile" in features:
            parts.append("AMX")
        return "x86-64 " + " ".join(parts)
    if arch in ("aarch64", "arm64", "ARM64"):
        named = [("asimd", "NEON"), ("asimddp", "dotprod"), ("i8mm", "i8mm"), ("sve", "SVE")]
        parts = [word for feature, word in named if feature in features]
        return "arm64 " + (" ".join(parts) if parts else "(no NEON reported)")
    return arch or "unknown"


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """(model name, flags) from the text of Linux's /proc/cpuinfo (x86 'flags', ARM 'Features'); the
    first processor's entry speaks for all."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "Hardware") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def _macos_features() -> tuple[str, set[str]]:
    def sysctl(name: str) -> str:
        done = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
        return done.stdout.strip() if done.returncode == 0 else ""

    found = {feature for name, feature in MACOS_SYSCTL.items() if sysctl(name) == "1"}
    return sysctl("machdep.cpu.brand_string"), found


def _torch_capability() -> str | None:
    try:
        import torch

        return torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError, RuntimeError):
        return None


_cached: CpuFeatures | None = None


def cpu_features() -> CpuFeatures:
    """This machine's kernel-picking CPU features (read once per process)."""
    global _cached
    if _cached is not None:
        return _cached
    arch = platform.machine()
    known = set(X86_FEATURES) | set(ARM_FEATURES)
    model, flags, source = "", set(), "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model, flags = parse_cpuinfo(f.read())
        source = "/proc/cpuinfo"
    except OSError:
        if platform.system() == "Darwin":
            try:
                model, flags = _macos_features()
                source = "sysctl"
            except (OSError, subprocess.SubprocessError):
                pass
    _cached = CpuFeatures(arch=arch, model=model or platform.processor() or arch,
                          features=tuple(f for f in (*X86_FEATURES, *ARM_FEATURES) if f in flags & known),
                          source=source, torch_capability=_torch_capability())
    return _cached
