"""What the processor can do, read from /proc/cpuinfo: the worker picks kernels by it, benches record it.

Machines of one kind come with Intel or AMD processors, with or without AVX-512, bf16, VNNI or
AMX, so nothing is assumed. torch reports only its dispatch level ("AVX2", "AVX512"), not bf16 or
VNNI, so the kernel flags come from the operating system.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field

# The flags that decide a kernel: native bf16 dot products, int8 dot products into int32.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
RECORDED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class CpuFeatures:
    model_name: str
    vendor: str
    flags: frozenset[str] = field(default_factory=frozenset)
    num_cpus: int = 1

    @property
    def bf16(self) -> bool:
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def vnni(self) -> bool:
        return any(f in self.flags for f in VNNI_FLAGS)

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags or "amx_int8" in self.flags

    def summary(self) -> dict:
        return {
            "model_name": self.model_name, "vendor": self.vendor, "num_cpus": self.num_cpus,
            "bf16": self.bf16, "vnni": self.vnni, "amx": self.amx,
            "flags": sorted(f for f in RECORDED_FLAGS if f in self.flags),
        }


def parse_cpuinfo(text: str, num_cpus: int = 1) -> CpuFeatures:
    """The first processor's model, vendor and flags (all cores of a VM report the same)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return CpuFeatures(
        model_name=fields.get("model name", platform.processor() or "unknown"),
        vendor=fields.get("vendor_id", "unknown"),
        flags=frozenset(fields.get("flags", "").split()),
        num_cpus=num_cpus,
    )


def available_cpus() -> int:
    """The cores this process may run on (its affinity), which is what torch threads should match."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.cache
def cpu_features() -> CpuFeatures:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return parse_cpuinfo(f.read(), available_cpus())
    except OSError:  # not Linux: no flags known, so every kernel choice takes the safe path
        return CpuFeatures(platform.processor() or "unknown", "unknown", frozenset(), available_cpus())


def cpu_has(flag: str) -> bool:
    return flag in cpu_features().flags
