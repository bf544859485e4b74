"""Prefill attention: a chunk of query tokens per request, causal, over paged K/V.

A request's chunk of `q_len` tokens ends its context of `seq_len` tokens, so query `j` sits at
position `seq_len - q_len + j` and may read keys `0..seq_len - q_len + j`. The earlier keys (a
prefix hit, or previous chunks of a chunked prefill) are read from the paged blocks exactly like
the chunk's own keys, which `write_kv` stored just before; there is no separate "dense" path.

Grid: (query tiles, KV heads, prefill requests). One program takes `BLOCK_Q` tokens times the
`GROUP` query heads that share one KV head, stacked into the rows of one matrix, so each K/V tile
is loaded once per group (grouped-query attention without repeating K/V). Keys are walked in
tiles of `TILE_N` tokens gathered through the block table, which makes the tile independent of the
KV block size (16, 32, ...). Softmax is the streaming (flash) form in base 2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.worker.kernels.triton.tiles import DotConfig, attend_keys


@triton.jit
def _prefill_kernel(
    q_ptr, out_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, req_ids_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cplane, stride_cblock, stride_cslot, stride_chead,
    stride_bt,
    head_dim,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    q_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = tl.load(req_ids_ptr + tl.program_id(2))
    q_start = tl.load(query_start_ptr + req)
    q_len = tl.load(query_start_ptr + req + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:  # the grid is sized for the longest chunk of the batch
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    token = q_tile * BLOCK_Q + rows // GROUP_P
    head = kv_head * GROUP + rows % GROUP_P
    row_valid = (token < q_len) & (rows % GROUP_P < GROUP)
    dims = tl.arange(0, HEAD_DIM_P)
    dim_valid = dims < head_dim
    q_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(q_ptr + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=q_mask, other=0.0).to(DOT_DTYPE)
    q_pos = context_len + token

    # The last query of this tile sees keys up to its own position; nothing later is loaded.
    kv_end = tl.minimum(seq_len, context_len + (q_tile + 1) * BLOCK_Q)
    acc, _, l_i = attend_keys(
        q, q_pos, block_tables_ptr + req * stride_bt, cache_ptr, 0, kv_end, kv_head, dims, dim_valid, scale_log2,
        stride_cplane, stride_cblock, stride_cslot, stride_chead,
        BLOCK_M, HEAD_DIM_P, TILE_N, BLOCK_SIZE, True, DOT_DTYPE, PRECISION,
    )
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=q_mask)


def prefill_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    req_ids: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor,
    dot: DotConfig,
) -> None:
    """Writes into `out` the attention of the chunks of the requests `req_ids` (indices into the
    batch's per-request tensors); `max_query_len` bounds their chunk lengths."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    # Rows per program: ~64 keeps the accumulator in registers at head_dim 128 on a GPU, and at
    # least 16 rows is what tl.dot needs.
    block_q = max(1, 64 // group_p)
    grid = (triton.cdiv(max_query_len, block_q), num_kv_heads, req_ids.numel())
    _prefill_kernel[grid](
        query, out, kv_cache, block_tables, seq_lens, query_start_loc, req_ids,
        scale * 1.4426950408889634,  # log2(e): the kernel exponentiates in base 2
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        head_dim,
        BLOCK_SIZE=block_size,
        GROUP=group,
        GROUP_P=group_p,
        HEAD_DIM_P=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_Q=block_q,
        BLOCK_M=block_q * group_p,
        TILE_N=dot.tile_n,
        DOT_DTYPE=dot.dtype,
        PRECISION=dot.precision,
        num_warps=dot.num_warps,
    )
