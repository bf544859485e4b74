"""The cache write: new K/V rows go into the slots a step names.

One program moves a few tokens with all their KV heads, K and V, so a step is one launch whatever
the layer's width. A few tokens rather than one: the same bytes in fewer programs, which costs a
GPU nothing and saves the CPU interpreter (tests) its per-program overhead. A negative slot is
skipped: padding rows that belong to no request may carry one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TOKENS_PER_PROGRAM = 8


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cplane, stride_cblock, stride_cslot, stride_chead,
    num_tokens, num_kv_heads, head_dim,
    BLOCK_SIZE: tl.constexpr,
    TOKENS: tl.constexpr,
    HEADS_P: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
):
    tokens = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
    slot = tl.load(slot_mapping_ptr + tokens, mask=tokens < num_tokens, other=-1)
    block = (slot // BLOCK_SIZE)[:, None, None]
    offset = (slot % BLOCK_SIZE)[:, None, None]
    heads = tl.arange(0, HEADS_P)[None, :, None]
    dims = tl.arange(0, HEAD_DIM_P)[None, None, :]
    mask = (slot >= 0)[:, None, None] & (heads < num_kv_heads) & (dims < head_dim)
    # Slots are int64, so this is too: a large pool's V plane lies beyond 2**31 elements.
    dst = block * stride_cblock + offset * stride_cslot + heads * stride_chead + dims
    t = tokens[:, None, None]
    key = tl.load(key_ptr + t * stride_kt + heads * stride_kh + dims, mask=mask)
    tl.store(cache_ptr + dst, key.to(cache_ptr.dtype.element_ty), mask=mask)
    value = tl.load(value_ptr + t * stride_vt + heads * stride_vh + dims, mask=mask)
    tl.store(cache_ptr + stride_cplane + dst, value.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Stores `key`/`value` ([num_tokens, num_kv_heads, head_dim]) at `slot_mapping` in `kv_cache`
    ([2, num_blocks, block_size, num_kv_heads, head_dim]), converting to the cache's dtype."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.stride(-1) != 1 or value.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("write_kv: key, value and kv_cache need a contiguous last (head_dim) axis")
    _write_kv_kernel[(triton.cdiv(num_tokens, TOKENS_PER_PROGRAM),)](
        key, value, kv_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        num_tokens, num_kv_heads, head_dim,
        BLOCK_SIZE=kv_cache.shape[2],
        TOKENS=TOKENS_PER_PROGRAM,
        HEADS_P=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_P=triton.next_power_of_2(head_dim),
    )
