"""The machine's limits, measured at the start of every bench run: GEMM throughput per precision
(float32, bfloat16, int8 through the worker's own dynamic int8 kernel) and memory copy bandwidth,
with torch on the threads a worker gets. A runner's throughput is then also stated as a fraction
of the compute floor of its precision: the time the workload's projections (2 FLOPs per weight per
token; attention is a few percent at these lengths and is left out) would take at peak GEMM speed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from shared.cpu_features import available_cpus, cpu_features

# Shapes of a 32-token-ish decode/prefill mix are too small to reach peak; the probe uses one large
# enough that the kernel, not Python, is measured (the floor is a bound, not a forecast).
GEMM_M, GEMM_K, GEMM_N = 512, 1536, 1536


def _best_rate(fn: Callable[[], object], work: float, min_s: float) -> float:
    """`work` units per second of the fastest of repeated calls over about `min_s` seconds."""
    fn()  # warm-up: packing, allocation, thread start
    best, t_end = float("inf"), time.perf_counter() + min_s
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return work / best


def probe(min_s: float = 1.0, num_threads: int | None = None) -> dict[str, Any]:
    """GFLOP/s (GOP/s for int8) per precision and copy GB/s, plus the CPU features that explain them."""
    from services.worker.linear import DynamicInt8Linear, dynamic_int8_available  # noqa: PLC0415

    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads or available_cpus())
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(GEMM_M, GEMM_K, generator=g)
        w = torch.randn(GEMM_N, GEMM_K, generator=g) * 0.02
        flops = 2.0 * GEMM_M * GEMM_K * GEMM_N
        gemm = {"float32": _best_rate(lambda: F.linear(x, w), flops, min_s) / 1e9}
        xb, wb = x.bfloat16(), w.bfloat16()
        gemm["bfloat16"] = _best_rate(lambda: F.linear(xb, wb), flops, min_s) / 1e9
        if dynamic_int8_available():
            q = DynamicInt8Linear(w, None)
            gemm["int8"] = _best_rate(lambda: q(x), flops, min_s) / 1e9
        src = torch.empty(64 * 2**20, dtype=torch.float32)  # 256 MiB: far beyond any cache
        dst = torch.empty_like(src)
        copy_gbps = _best_rate(lambda: dst.copy_(src), 2.0 * src.numel() * 4, min_s) / 1e9  # read + write
        return {"num_threads": torch.get_num_threads(), "gemm_shape": [GEMM_M, GEMM_K, GEMM_N],
                "gemm_gflops": {k: round(v, 1) for k, v in gemm.items()}, "copy_gbps": round(copy_gbps, 1),
                "cpu": cpu_features().summary()}
    finally:
        torch.set_num_threads(previous)


def projection_params(model_dir: Path) -> dict[str, int]:
    """Weights per token of each projection family, from config.json (the head counts once)."""
    c = json.loads((model_dir / "config.json").read_text())
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or h // heads
    return {
        "qkv": layers * h * (heads + 2 * kv_heads) * head_dim, "o": layers * heads * head_dim * h,
        "gate_up": layers * 2 * h * inter, "down": layers * inter * h, "lm_head": h * c["vocab_size"],
    }


# Which GEMM precision each projection of a runner uses (ours: int8 keeps down in float32).
PRECISIONS = {
    "float32": dict.fromkeys(("qkv", "o", "gate_up", "down", "lm_head"), "float32"),
    "bfloat16": dict.fromkeys(("qkv", "o", "gate_up", "down", "lm_head"), "bfloat16"),
    "switchyard_int8": {"qkv": "int8", "o": "int8", "gate_up": "int8", "down": "float32", "lm_head": "int8"},
    # llama.cpp's Q4_1 dot products quantize activations to 8 bits: int8 arithmetic is its bound.
    "q4_1": dict.fromkeys(("qkv", "o", "gate_up", "down", "lm_head"), "int8"),
}


def _peak(peaks: dict[str, float], precision: str) -> float | None:
    """The best GEMM rate that computes `precision` exactly: bf16 weights widen to float32 without
    loss, so on a CPU without native bf16 (where torch emulates it slowly) the float32 rate bounds
    a bf16 runner; llama.cpp does exactly that. int8 and float32 stand for themselves."""
    if precision == "bfloat16":
        return max((peaks[k] for k in ("bfloat16", "float32") if peaks.get(k)), default=None)
    return peaks.get(precision)


def floor_s(roofline: dict[str, Any], model_dir: Path, num_tokens: int, precision: str) -> float | None:
    """Seconds the projections of `num_tokens` tokens (prompt + output) take at peak GEMM speed."""
    peaks = roofline.get("gemm_gflops", {})
    total = 0.0
    for family, params in projection_params(model_dir).items():
        peak = _peak(peaks, PRECISIONS[precision][family])
        if not peak:
            return None
        total += 2.0 * params * num_tokens / (peak * 1e9)
    return total


def fraction_of_floor(roofline: dict[str, Any], model_dir: Path, num_tokens: int, precision: str,
                      duration_s: float | None) -> float | None:
    floor = floor_s(roofline, model_dir, num_tokens, precision)
    return None if floor is None or not duration_s else floor / duration_s


def describe(roofline: dict[str, Any]) -> str:
    g = roofline["gemm_gflops"]
    cpu = roofline["cpu"]
    return (f"{cpu['model_name']} ({cpu['num_cpus']} cores; bf16 {cpu['bf16']}, VNNI {cpu['vnni']}, AMX {cpu['amx']}): "
            + ", ".join(f"{k} GEMM {v:.0f} G{'OP' if k == 'int8' else 'FLOP'}/s" for k, v in g.items())
            + f", copy {roofline['copy_gbps']:.0f} GB/s on {roofline['num_threads']} threads")
