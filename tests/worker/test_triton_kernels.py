"""The Triton kernels against the torch reference on small shapes.

On a machine without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), which
is how CI verifies them; with CUDA the same tests run compiled on the GPU. Every batch is built on
a dirty pool whose slots outside any request's context hold NaN, so a kernel that reads a slot it
should not (past a context's end, a padded block-table entry, the null block) fails loudly, while
the torch reference runs on the same pool with finite garbage there.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # Triton decides interpreted vs compiled when a kernel is decorated, i.e. when the kernel
    # modules are first imported, so this comes first. It stays set for the rest of the process:
    # Triton imports parts of itself lazily and checks the flag again then; and without CUDA no
    # compiled Triton kernel could run anyway, so nothing else can lose by it.
    os.environ["TRITON_INTERPRET"] = "1"
# No skip on ImportError: CI is where these kernels get verified, so a missing Triton fails.
from services.worker.kernels.triton import INTERPRETED, TritonAttentionBackend  # noqa: E402
from services.worker.kernels.triton.decode import decode_num_splits  # noqa: E402
from services.worker.kernels import build_metadata, select_backend  # noqa: E402
from services.worker.kernels.interface import AttentionMetadata  # noqa: E402
from services.worker.kernels.torch_backend import TorchAttentionBackend  # noqa: E402

# Atol/rtol against a float32 reference computed from the same (already rounded) K/V and queries.
# float32: both sides are exact fp32 math, differing only in summation order (seen: ~1e-6).
# float16: the kernel rounds the softmax weights to fp16 before the P@V matmul (as flash
# attention does) and rounds the output; fp16 has an 11-bit mantissa, so ~1e-3 on outputs of
# order 1. bfloat16: 8-bit mantissa, output rounding alone is up to 2**-8 relative.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}


@dataclass
class Batch:
    meta: AttentionMetadata
    query: torch.Tensor
    new_key: torch.Tensor
    new_value: torch.Tensor
    cache: torch.Tensor  # context written except the new tokens; finite garbage elsewhere
    context_slots: torch.Tensor  # bool per slot: part of some request's context after this step


def make_batch(shapes: list[tuple[int, int]], *, num_heads: int, num_kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Batch:
    """`shapes` is (query_len, seq_len) per request: a decode is (1, L), a chunk after cached
    context is (n, L > n), a fresh prefill is (n, n)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = 2 + sum(-(-s // block_size) for _, s in shapes)
    free = list(range(1, num_blocks))
    rng.shuffle(free)  # tables point all over the pool, never in order
    tables = [[free.pop() for _ in range(-(-s // block_size))] for _, s in shapes]
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    context_slots = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    new_keys, new_values = [], []
    for (q_len, seq_len), table in zip(shapes, tables):
        keys = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        values = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        for pos in range(seq_len):
            slot = table[pos // block_size] * block_size + pos % block_size
            context_slots[slot] = True
            if pos < seq_len - q_len:  # cached context (prefix hit, earlier chunks, past decodes)
                cache[0, table[pos // block_size], pos % block_size] = keys[pos]
                cache[1, table[pos // block_size], pos % block_size] = values[pos]
        new_keys.append(keys[seq_len - q_len:])
        new_values.append(values[seq_len - q_len:])
    num_tokens = sum(q for q, _ in shapes)
    query = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    meta = build_metadata([q for q, _ in shapes], [s for _, s in shapes], tables, block_size, DEVICE)
    to = lambda t: t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return Batch(meta, to(query), to(torch.cat(new_keys)), to(torch.cat(new_values)), to(cache),
                 context_slots.to(DEVICE))


def check_batch(batch: Batch, backend: TritonAttentionBackend) -> torch.Tensor:
    """Writes the new K/V and runs attention with both backends; asserts they agree."""
    head_dim = batch.query.shape[-1]
    scale = head_dim**-0.5
    reference = TorchAttentionBackend()
    ref_cache = batch.cache.clone()
    reference.write_kv(batch.new_key, batch.new_value, ref_cache, batch.meta.slot_mapping)
    # float32 reference from the same rounded values: tolerances then measure the kernels only.
    expected = reference.attention(batch.query.float(), ref_cache.float(), batch.meta, scale)

    poisoned = batch.cache.clone()
    flat = poisoned.view(2, -1, *poisoned.shape[3:])
    flat[:, ~batch.context_slots] = float("nan")
    backend.write_kv(batch.new_key, batch.new_value, poisoned, batch.meta.slot_mapping)
    ref_flat = ref_cache.view(2, -1, *ref_cache.shape[3:])
    assert torch.equal(flat[:, batch.context_slots], ref_flat[:, batch.context_slots])
    assert torch.isnan(flat[:, ~batch.context_slots]).all(), "write_kv touched a slot it was not given"

    out = backend.attention(batch.query, poisoned, batch.meta, scale)
    assert out.dtype == batch.query.dtype and out.shape == batch.query.shape
    atol, rtol = TOLERANCES[batch.query.dtype]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)
    return out


def mixed_shapes(block_size: int) -> list[tuple[int, int]]:
    b = block_size
    return [
        (1, 1),  # first decode token: a 1-token context, one block with one slot used
        (1, b),  # context ends exactly at a block boundary (full block)
        (1, b + 1),  # a new block holding one token, the rest of it empty
        (5, 5),  # a fresh prefill inside one block
        (b, 2 * b),  # a chunk of exactly one block after one cached block (chunked prefill)
        (3, 2 * b + 2),  # a short chunk after a prefix hit, crossing into a third block
        (1, 3 * b + 7),  # a decode over several blocks
        (40, 40 + b + 3),  # a long chunk spanning several query tiles after cached context
        (2 * b + 1, 2 * b + 1),  # a fresh prefill crossing two block boundaries
    ]


def test_interpreter_is_active_without_cuda() -> None:
    # A kernels module imported earlier without TRITON_INTERPRET would make every test below
    # fail obscurely on the CPU; say so plainly instead.
    assert INTERPRETED == (DEVICE == "cpu")


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (6, 2), (8, 1)])
def test_mixed_prefill_and_decode_batch(block_size: int, num_heads: int, num_kv_heads: int) -> None:
    batch = make_batch(mixed_shapes(block_size), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=32,
                       block_size=block_size, seed=block_size + num_heads * 7 + num_kv_heads)
    check_batch(batch, TritonAttentionBackend(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_half_precision(dtype: torch.dtype, block_size: int) -> None:
    # bf16 runs in the interpreter too, with tl.dot operands widened to fp32 there (numpy has no
    # bf16); on a GPU it is the real bf16 tensor-core path.
    batch = make_batch(mixed_shapes(block_size), num_heads=8, num_kv_heads=2, head_dim=64,
                       block_size=block_size, dtype=dtype, seed=3)
    check_batch(batch, TritonAttentionBackend(DEVICE))


@pytest.mark.parametrize("num_splits,tile_n", [(1, 16), (2, 16), (3, 16), (8, 16), (4, 64)])
def test_split_k_decode(num_splits: int, tile_n: int) -> None:
    # Context lengths from 1 (most splits empty) through block edges to several tiles per split.
    shapes = [(1, n) for n in (1, 15, 16, 17, 64, 100, 257)]
    batch = make_batch(shapes, num_heads=8, num_kv_heads=2, head_dim=32, block_size=16, seed=num_splits)
    assert batch.meta.is_pure_decode
    check_batch(batch, TritonAttentionBackend(DEVICE, num_splits=num_splits, tile_n=tile_n))


def test_split_k_in_a_mixed_batch() -> None:
    batch = make_batch([(1, 70), (9, 40), (1, 33), (1, 2)], num_heads=4, num_kv_heads=2, head_dim=32,
                       block_size=32, seed=11)
    check_batch(batch, TritonAttentionBackend(DEVICE, num_splits=4, tile_n=16))


def test_head_dim_not_a_power_of_two() -> None:
    # head_dim 40 and a group of 3 both leave padded lanes in every tile.
    batch = make_batch([(1, 20), (7, 30), (17, 17)], num_heads=6, num_kv_heads=2, head_dim=40, block_size=16,
                       seed=5)
    check_batch(batch, TritonAttentionBackend(DEVICE, num_splits=2, tile_n=16))


def test_write_kv_converts_dtype_and_skips_negative_slots() -> None:
    backend = TritonAttentionBackend(DEVICE)
    cache = torch.zeros(2, 4, 16, 2, 8, dtype=torch.float16, device=DEVICE)
    key = torch.randn(3, 2, 8, device=DEVICE)
    value = torch.randn(3, 2, 8, device=DEVICE)
    slots = torch.tensor([17, -1, 63], device=DEVICE)  # -1: a padding row that owns no slot
    backend.write_kv(key, value, cache, slots)
    flat = cache.view(2, 64, 2, 8)
    assert torch.equal(flat[0, 17], key[0].half()) and torch.equal(flat[1, 63], value[2].half())
    flat[:, [17, 63]] = 0
    assert torch.count_nonzero(flat) == 0


def test_empty_batch() -> None:
    backend = TritonAttentionBackend(DEVICE)
    meta = build_metadata([], [], [], 16, DEVICE)
    cache = torch.zeros(2, 2, 16, 1, 16, device=DEVICE)
    out = backend.attention(torch.empty(0, 2, 16, device=DEVICE), cache, meta, 0.25)
    assert out.shape == (0, 2, 16)


def test_select_backend_picks_triton_when_asked() -> None:
    assert select_backend(DEVICE, "triton").name == "triton"
    assert select_backend("cpu", "auto").name == "torch"


def test_select_backend_without_triton_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail as it would on an install without Triton.
    monkeypatch.setitem(sys.modules, "services.worker.kernels.triton", None)
    with pytest.raises(ValueError, match="triton is not available"):
        select_backend(DEVICE, "triton")
    assert select_backend("cpu", "auto").name == "torch"


@pytest.mark.parametrize(
    "num_reqs,num_kv_heads,max_seq_len,num_sms,expected",
    [
        (64, 8, 4096, 132, 1),  # 512 programs already fill two waves of an H100
        (1, 8, 32768, 132, 32),  # one long request: as many splits as allowed
        (4, 8, 32768, 132, 8),
        (1, 8, 300, 132, 1),  # too short to split
        (1, 8, 1024, 132, 4),  # capped at one split per 256 keys
        (2, 2, 100_000, 8, 4),  # a small GPU: two waves are 16 programs
    ],
)
def test_decode_num_splits(num_reqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int, expected: int) -> None:
    assert decode_num_splits(num_reqs, num_kv_heads, max_seq_len, num_sms) == expected
