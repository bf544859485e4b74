"""CPU feature detection from /proc/cpuinfo text: Intel and AMD, with and without bf16/VNNI/AMX."""

from __future__ import annotations

from shared.cpu_features import cpu_features, parse_cpuinfo

SAPPHIRE = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags		: fpu sse2 avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8

processor	: 1
vendor_id	: GenuineIntel
flags		: fpu
"""
EPYC_AVX2 = """processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC 7B12
flags		: fpu sse2 avx2 fma
"""


def test_intel_with_amx_has_bf16_vnni_and_amx() -> None:
    f = parse_cpuinfo(SAPPHIRE, num_cpus=2)
    assert (f.vendor, f.bf16, f.vnni, f.amx) == ("GenuineIntel", True, True, True)
    assert f.model_name.startswith("Intel(R) Xeon(R) Platinum")
    assert f.summary()["flags"] == ["amx_bf16", "amx_int8", "avx2", "avx512_bf16", "avx512_vnni", "avx512f", "fma"]


def test_amd_avx2_has_none_of_them_and_only_the_first_processor_counts() -> None:
    f = parse_cpuinfo(EPYC_AVX2)
    assert (f.vendor, f.bf16, f.vnni, f.amx) == ("AuthenticAMD", False, False, False)
    assert f.summary()["flags"] == ["avx2", "fma"]


def test_this_machine_is_described() -> None:
    f = cpu_features()
    assert f.num_cpus >= 1 and f.model_name
    assert set(f.summary()) == {"model_name", "vendor", "num_cpus", "bf16", "vnni", "amx", "flags"}
