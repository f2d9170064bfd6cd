"""The instruction-set label that bench results record and reports compare."""

from __future__ import annotations

import pytest

from compress.cpu_features import CpuFeatures, cpu_features, isa_label, parse_cpuinfo

EPYC_GENOA = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse sse2 avx avx2 fma f16c avx512f avx512dq avx512bw avx512vl avx_vnni avx512_bf16 avx512_vnni
processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse sse2
"""
EPYC_ROME = """processor\t: 0
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c
"""
SKYLAKE_SP = "model name\t: Intel(R) Xeon(R) Platinum 8175M\nflags\t\t: sse4_2 avx2 fma avx512f avx512bw avx512vl\n"
SAPPHIRE_RAPIDS = ("model name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t\t: avx2 avx512f avx512bw avx512_vnni "
                   "avx512_bf16 amx_bf16 amx_tile amx_int8\n")
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd evtstrm aes asimddp sve i8mm bf16 asimdhp\n"


@pytest.mark.parametrize("text, arch, label", [
    (EPYC_GENOA, "x86_64", "x86-64 AVX-512 VNNI"),
    (EPYC_ROME, "x86_64", "x86-64 AVX2"),
    (SKYLAKE_SP, "x86_64", "x86-64 AVX-512"),  # AVX-512 without VNNI: the saturating u8 x s8 path
    (SAPPHIRE_RAPIDS, "x86_64", "x86-64 AVX-512 VNNI AMX"),
    (GRAVITON3, "aarch64", "arm64 NEON dotprod i8mm SVE"),
])
def test_cpuinfo_gives_the_kernel_picking_label(text, arch, label):
    model, flags = parse_cpuinfo(text)
    assert isa_label(arch, flags) == label
    assert model != "" or arch == "aarch64"


def test_the_first_processor_speaks_for_all():
    model, flags = parse_cpuinfo(EPYC_GENOA)
    assert model == "AMD EPYC 9R14" and "avx512_vnni" in flags


def test_avx_vnni_without_avx512_is_vnni_on_avx2():
    assert isa_label("x86_64", {"avx2", "avx_vnni"}) == "x86-64 AVX2 VNNI"
    assert isa_label("x86_64", set()) == "x86-64 SSE"
    assert isa_label("arm64", set()) == "arm64 (no NEON reported)"


def test_this_machine_is_described_consistently():
    cpu = cpu_features()
    assert cpu is cpu_features()  # read once per process
    assert cpu.isa == isa_label(cpu.arch, set(cpu.features))
    record = cpu.to_dict()
    assert record["isa"] == cpu.isa and isinstance(record["features"], list)
    rebuilt = CpuFeatures(arch=record["arch"], model=record["model"], features=tuple(record["features"]),
                          source=record["source"], torch_capability=record["torch_capability"])
    assert rebuilt == cpu
