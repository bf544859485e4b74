"""The torch paged attention against dense causal attention computed from unpaged K/V."""

from __future__ import annotations

import random

import pytest
import torch

from services.worker.kernels import build_metadata
from services.worker.kernels.torch_backend import TorchAttentionBackend


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, H, D] at the last n positions of k/v [L, Hkv, D]; plain softmax, no paging."""
    n, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for h in range(num_heads):
        scores = (q[:, h] @ k[:, h // group].T) * scale  # [n, L]
        for j in range(n):
            scores[j, seq_len - n + j + 1 :] = float("-inf")
        out[:, h] = torch.softmax(scores, dim=-1) @ v[:, h // group]
    return out


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (6, 1)])
def test_paged_attention_matches_dense(block_size: int, num_heads: int, num_kv_heads: int) -> None:
    torch.manual_seed(0)
    rng = random.Random(block_size * 100 + num_heads)
    head_dim, num_blocks = 8, 64
    backend = TorchAttentionBackend()
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim)  # dirty, like a reused pool
    # (query_len, seq_len): decodes, a full prefill, chunks after cached context, block-boundary edges.
    shapes = [(1, 1), (1, block_size), (1, block_size + 1), (5, 5), (3, 2 * block_size),
              (block_size, 3 * block_size + 2), (1, 37), (7, 7 + block_size)]
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    tables, keys, values = [], [], []
    for _, seq_len in shapes:
        table = [free.pop() for _ in range(-(-seq_len // block_size))]
        tables.append(table)
        keys.append(torch.randn(seq_len, num_kv_heads, head_dim))
        values.append(torch.randn(seq_len, num_kv_heads, head_dim))
    meta = build_metadata([q for q, _ in shapes], [s for _, s in shapes], tables, block_size, "cpu")
    # Cached context goes in directly; the new tokens go through write_kv, as in a real step.
    for (q_len, seq_len), table, k, v in zip(shapes, tables, keys, values):
        for pos in range(seq_len - q_len):
            kv_cache[0, table[pos // block_size], pos % block_size] = k[pos]
            kv_cache[1, table[pos // block_size], pos % block_size] = v[pos]
    new_k = torch.cat([k[s - q:] for (q, s), k in zip(shapes, keys)])
    new_v = torch.cat([v[s - q:] for (q, s), v in zip(shapes, values)])
    backend.write_kv(new_k, new_v, kv_cache, meta.slot_mapping)
    query = torch.randn(sum(q for q, _ in shapes), num_heads, head_dim)
    out = backend.attention(query, kv_cache, meta, scale=head_dim**-0.5)
    start = 0
    for (q_len, _), k, v in zip(shapes, keys, values):
        expected = dense_attention(query[start : start + q_len], k, v, head_dim**-0.5)
        torch.testing.assert_close(out[start : start + q_len], expected, atol=1e-5, rtol=1e-5)
        start += q_len


def test_write_kv_touches_only_named_slots() -> None:
    kv_cache = torch.zeros(2, 8, 4, 2, 3)
    slots = torch.tensor([5, 9, 30])
    TorchAttentionBackend().write_kv(torch.ones(3, 2, 3), 2 * torch.ones(3, 2, 3), kv_cache, slots)
    flat = kv_cache.view(2, 32, 2, 3)
    written = torch.zeros(32, dtype=torch.bool)
    written[slots] = True
    assert torch.all(flat[0][written] == 1) and torch.all(flat[1][written] == 2)
    assert torch.all(flat[:, ~written] == 0)


@pytest.mark.parametrize("shapes", [
    [(1, 9), (1, 20), (1, 3)],  # a pure decode step: the output is SDPA's own result
    [(1, 9), (1, 20), (6, 6), (4, 10)],  # decode rows first, then a fresh prompt and a chunk after context
])
def test_one_step_plan_serves_every_layer_and_fresh_prompts_read_their_own_kv(shapes) -> None:
    """The per-step plan is reused across layers (two caches here); a fresh prompt's K/V come
    from write_kv, and without a write_kv just before they are read back from the blocks."""
    torch.manual_seed(1)
    block_size, num_heads, num_kv_heads, head_dim = 4, 6, 2, 8
    backend = TorchAttentionBackend()
    tables, start = [], 1
    for _, seq_len in shapes:
        tables.append(list(range(start, start + -(-seq_len // block_size))))
        start += len(tables[-1])
    meta = build_metadata([q for q, _ in shapes], [s for _, s in shapes], tables, block_size, "cpu")
    for layer in range(2):
        kv_cache = torch.randn(2, start, block_size, num_kv_heads, head_dim)
        keys = [torch.randn(s, num_kv_heads, head_dim) for _, s in shapes]
        values = [torch.randn(s, num_kv_heads, head_dim) for _, s in shapes]
        for (q_len, seq_len), table, k, v in zip(shapes, tables, keys, values):
            for pos in range(seq_len - q_len if layer == 0 else seq_len):  # layer 1: everything pre-stored
                kv_cache[0, table[pos // block_size], pos % block_size] = k[pos]
                kv_cache[1, table[pos // block_size], pos % block_size] = v[pos]
        if layer == 0:
            backend.write_kv(torch.cat([k[s - q:] for (q, s), k in zip(shapes, keys)]),
                             torch.cat([v[s - q:] for (q, s), v in zip(shapes, values)]), kv_cache, meta.slot_mapping)
        query = torch.randn(sum(q for q, _ in shapes), num_heads, head_dim)
        out = backend.attention(query, kv_cache, meta, scale=0.3)
        row = 0
        for (q_len, _), k, v in zip(shapes, keys, values):
            torch.testing.assert_close(out[row : row + q_len], dense_attention(query[row : row + q_len], k, v, 0.3),
                                       atol=1e-5, rtol=1e-5)
            row += q_len
