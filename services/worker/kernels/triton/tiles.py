"""The tile config every attention kernel shares: key tile length, matmul dtype and precision.

Chosen once per (dtype, device) by the backend, so the kernels themselves hold no policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton.language as tl

# Reductions for the kernels, used as `tl.reduce(x, axis, max_combine)` instead of `tl.max(x, axis)`.
# tl.max/tl.sum/tl.zeros/tl.cdiv are themselves @triton.jit functions, decorated (compiled or
# interpreted) when Triton is first imported; under the CPU interpreter, Triton may have been
# imported earlier in the process without TRITON_INTERPRET (transformers imports it), and calling
# a compiled-mode jit function from an interpreted kernel fails. tl.reduce is a builtin, and the
# interpreter recognises these combine functions by identity and runs them as numpy reductions;
# compiled, it is exactly what tl.max/tl.sum do for the float32 values reduced here.
max_combine = tl.standard._elementwise_max
sum_combine = tl.standard._sum_combine

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@dataclass(frozen=True)
class DotConfig:
    dtype: tl.dtype  # operand dtype of tl.dot (accumulation is always float32)
    precision: str  # tl.dot input_precision: "ieee" keeps float32 exact, "tf32" is ignored for 16-bit
    tile_n: int  # keys per loop iteration, gathered across KV blocks
    num_warps: int


def dot_config(dtype: torch.dtype, interpreted: bool) -> DotConfig:
    """The config for queries of `dtype`; `interpreted` is Triton's CPU interpreter (tests)."""
    if dtype not in _TL_DTYPES:
        raise ValueError(f"attention: triton kernels take float16, bfloat16 or float32, got {dtype}")
    operand = _TL_DTYPES[dtype]
    if interpreted and dtype == torch.bfloat16:
        # The interpreter runs tl.dot as numpy matmul, and numpy has no bfloat16 (it sees the raw
        # uint16 bits), so bf16 operands are widened there; bf16 loads/stores still run as on a GPU.
        operand = tl.float32
    # fp32 models get exact fp32 matmuls like torch's defaults (no TF32), so greedy output stays
    # comparable to the torch backend; 16-bit operands use tensor cores either way.
    precision = "ieee" if operand == tl.float32 else "tf32"
    # 64 keys x head_dim 128 of 16-bit K and V fit shared memory comfortably at two stages; fp32
    # operands take twice the room, hence 32.
    tile_n = 32 if operand == tl.float32 and not interpreted else 64
    return DotConfig(dtype=operand, precision=precision, tile_n=tile_n, num_warps=4)
