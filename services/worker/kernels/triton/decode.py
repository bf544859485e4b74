"""Decode attention: one query token per request over its paged context, split-K when long.

A decode token is the last position of its context, so it sees every key and needs no causal
mask. Decode is bound by reading K/V, and a batch of a few long requests gives too few programs
to keep every SM reading: the context is cut into `num_splits` contiguous pieces, each program
reduces one piece to a partial output and its log-sum-exp, and a second kernel merges the pieces.
Where one split is enough, the first kernel writes the output itself.

Grid: (decode requests, KV heads, splits). The `GROUP` query heads of one KV head form the rows of
one matrix (padded to the 16 rows tl.dot needs), so K/V are read once per group. Split ranges are
computed in the kernel from the device `seq_lens`, never from host lengths, so a CUDA graph
captured once replays correctly for any context length.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.worker.kernels.triton.tiles import DotConfig, attend_keys, max_combine, sum_combine

MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost outweighs the extra parallelism
MAX_SPLITS = 32


def decode_num_splits(num_reqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Splits per request: enough programs for about two waves over `num_sms`, no split shorter
    than MIN_TOKENS_PER_SPLIT keys, a power of two (the merge kernel compiles one variant per
    power of two, so this bounds them to six)."""
    programs = max(1, num_reqs * num_kv_heads)
    wanted = min(triton.cdiv(2 * num_sms, programs), max_seq_len // MIN_TOKENS_PER_SPLIT, MAX_SPLITS)
    splits = 1
    while splits * 2 <= wanted:
        splits *= 2
    return splits


@triton.jit
def _decode_kernel(
    q_ptr, out_ptr, part_out_ptr, part_lse_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr,
    query_start_ptr, req_ids_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cplane, stride_cblock, stride_cslot, stride_chead,
    stride_bt,
    num_heads, head_dim, num_splits,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    TILE_N: tl.constexpr,
    ALL_DECODE: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if ALL_DECODE:  # a pure decode batch: program i is request i, no index tensor needed
        req = i
    else:
        req = tl.load(req_ids_ptr + i)
    token = tl.load(query_start_ptr + req)
    seq_len = tl.load(seq_lens_ptr + req)
    per_split = ((seq_len + num_splits - 1) // num_splits + TILE_N - 1) // TILE_N * TILE_N
    kv_start = split * per_split
    kv_end = tl.minimum(seq_len, kv_start + per_split)

    rows = tl.arange(0, ROWS)
    head = kv_head * GROUP + rows
    row_valid = rows < GROUP
    dims = tl.arange(0, HEAD_DIM_P)
    dim_valid = dims < head_dim
    q_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(q_ptr + token * stride_qt + head[:, None] * stride_qh + dims[None, :], mask=q_mask,
                other=0.0).to(DOT_DTYPE)

    acc, m_i, l_i = attend_keys(
        q, kv_end, block_tables_ptr + req * stride_bt, cache_ptr, kv_start, kv_end, kv_head, dims, dim_valid,
        scale_log2, stride_cplane, stride_cblock, stride_cslot, stride_chead,
        ROWS, HEAD_DIM_P, TILE_N, BLOCK_SIZE, False, DOT_DTYPE, PRECISION,  # the last token sees every key
    )
    has_keys = l_i > 0  # false only for a split past the end of a short context
    acc = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if SPLIT:
        part = (i * num_heads + head) * num_splits + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM_P + dims[None, :], acc, mask=row_valid[:, None])
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_valid)
    else:
        tl.store(out_ptr + token * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, query_start_ptr, req_ids_ptr,
    stride_ot, stride_oh,
    num_heads, head_dim, num_splits,
    SPLITS_P: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    ALL_DECODE: tl.constexpr,
):
    i = tl.program_id(0)
    head = tl.program_id(1)
    if ALL_DECODE:
        req = i
    else:
        req = tl.load(req_ids_ptr + i)
    token = tl.load(query_start_ptr + req)
    splits = tl.arange(0, SPLITS_P)
    dims = tl.arange(0, HEAD_DIM_P)
    part = (i * num_heads + head) * num_splits + splits
    # Split 0 always holds at least one key (seq_len >= 1), so the max below is finite.
    lse = tl.load(part_lse_ptr + part, mask=splits < num_splits, other=float("-inf"))
    weight = tl.exp2(lse - tl.reduce(lse, 0, max_combine))
    partial = tl.load(part_out_ptr + part[:, None] * HEAD_DIM_P + dims[None, :],
                      mask=(splits < num_splits)[:, None], other=0.0)
    merged = tl.reduce(weight[:, None] * partial, 0, sum_combine) / tl.reduce(weight, 0, sum_combine)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, merged.to(out_ptr.dtype.element_ty),
             mask=dims < head_dim)


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    req_ids: torch.Tensor | None,
    num_reqs: int,
    num_splits: int,
    scale: float,
    out: torch.Tensor,
    dot: DotConfig,
) -> None:
    """Writes into `out` the attention of the decode tokens of `num_reqs` requests: the requests
    `req_ids` (indices into the batch), or, with `req_ids=None`, requests `0..num_reqs-1` of a pure
    decode batch (no index tensor: what a CUDA graph captures)."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    group = num_heads // num_kv_heads
    head_dim_p = max(16, triton.next_power_of_2(head_dim))
    all_decode = req_ids is None
    req_ids_arg = query_start_loc if all_decode else req_ids  # unread when ALL_DECODE
    split = num_splits > 1
    if split:
        part_out = torch.empty((num_reqs, num_heads, num_splits, head_dim_p), dtype=torch.float32,
                               device=query.device)
        part_lse = torch.empty((num_reqs, num_heads, num_splits), dtype=torch.float32, device=query.device)
    else:
        part_out = part_lse = out  # unread when not SPLIT
    _decode_kernel[(num_reqs, num_kv_heads, num_splits)](
        query, out, part_out, part_lse, kv_cache, block_tables, seq_lens, query_start_loc, req_ids_arg,
        scale * 1.4426950408889634,  # log2(e): the kernel exponentiates in base 2
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        num_heads, head_dim, num_splits,
        BLOCK_SIZE=block_size,
        GROUP=group,
        ROWS=max(16, triton.next_power_of_2(group)),
        HEAD_DIM_P=head_dim_p,
        TILE_N=dot.tile_n,
        ALL_DECODE=all_decode,
        SPLIT=split,
        DOT_DTYPE=dot.dtype,
        PRECISION=dot.precision,
        num_warps=dot.num_warps,
    )
    if split:
        _merge_splits_kernel[(num_reqs, num_heads)](
            part_out, part_lse, out, query_start_loc, req_ids_arg,
            out.stride(0), out.stride(1),
            num_heads, head_dim, num_splits,
            SPLITS_P=triton.next_power_of_2(num_splits),
            HEAD_DIM_P=head_dim_p,
            ALL_DECODE=all_decode,
        )
