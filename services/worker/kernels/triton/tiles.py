"""What every attention kernel shares: the tile config (key tile length, matmul dtype and
precision), chosen once per (dtype, device) by the backend so the kernels hold no policy, and the
streaming-softmax loop over paged keys (`attend_keys`) that prefill and decode both run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
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


@triton.jit
def attend_keys(
    q, q_pos, table, cache_ptr, kv_start, kv_end, kv_head, dims, dim_valid, scale_log2,
    stride_cplane, stride_cblock, stride_cslot, stride_chead,
    ROWS: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    TILE_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Streaming (flash) softmax of the `ROWS` query rows `q` over keys `kv_start..kv_end` of one KV
    head, gathered `TILE_N` at a time through the block table `table`, in base 2. With `CAUSAL`, row
    r sees only keys at positions <= `q_pos[r]`. Returns the unnormalised output and the running
    max and sum `(acc, m_i, l_i)`: a row that saw no key has `l_i == 0`."""
    # A finite floor instead of -inf keeps exp2(m_old - m_new) defined while a row has seen only
    # masked keys (padding rows never see any).
    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)
    l_i = tl.full([ROWS], 0.0, dtype=tl.float32)
    acc = tl.full([ROWS, HEAD_DIM_P], 0.0, dtype=tl.float32)
    for start in range(kv_start, kv_end, TILE_N):
        n = start + tl.arange(0, TILE_N)
        n_valid = n < kv_end
        block = tl.load(table + n // BLOCK_SIZE, mask=n_valid, other=0)
        kv_off = block * stride_cblock + (n % BLOCK_SIZE) * stride_cslot + kv_head * stride_chead
        kv_mask = n_valid[:, None] & dim_valid[None, :]
        k = tl.load(cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        if CAUSAL:
            s = tl.where((n[None, :] <= q_pos[:, None]) & n_valid[None, :], s, float("-inf"))
        else:
            s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, max_combine))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, sum_combine)
        v = tl.load(cache_ptr + stride_cplane + kv_off[:, None] + dims[None, :], mask=kv_mask,
                    other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i
