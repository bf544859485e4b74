"""Block pool: ref counts, the reserved null block, LRU free-list order and the three counts."""

from __future__ import annotations

import pytest

from services.scheduler.block_pool import NULL_BLOCK_ID, BlockPool
from shared.errors import InvalidArgument, ResourceExhausted


def make_pool(num_blocks: int = 5) -> tuple[BlockPool, list[tuple[bytes, int]]]:
    """A pool plus the list its eviction callback appends (hash, block id) to."""
    evicted: list[tuple[bytes, int]] = []
    pool = BlockPool(num_blocks, on_evict=lambda block_hash, block_id: evicted.append((block_hash, block_id)))
    return pool, evicted


def counts(pool: BlockPool) -> tuple[int, int, int]:
    assert pool.num_used + pool.num_cached + pool.num_free == pool.num_usable
    return pool.num_used, pool.num_cached, pool.num_free


def publish(pool: BlockPool, block_id: int) -> bytes:
    block_hash = bytes([block_id]) * 16
    pool.set_hash(block_id, block_hash, (block_id,) * 4)
    return block_hash


def test_null_block_is_never_handed_out() -> None:
    pool, _ = make_pool(5)
    assert pool.num_usable == 4
    for _ in range(3):  # churn: the null block must not sneak in after frees either
        block_ids = pool.allocate(4)
        assert sorted(block_ids) == [1, 2, 3, 4]
        assert NULL_BLOCK_ID not in pool.free_block_ids()
        for block_id in block_ids:
            pool.free(block_id)
    with pytest.raises(InvalidArgument):
        pool.ref(NULL_BLOCK_ID)
    with pytest.raises(InvalidArgument):
        pool.free(NULL_BLOCK_ID)


def test_allocate_is_all_or_nothing() -> None:
    pool, _ = make_pool(5)
    pool.allocate(2)
    before = (counts(pool), pool.free_block_ids())
    with pytest.raises(ResourceExhausted):
        pool.allocate(3)
    assert (counts(pool), pool.free_block_ids()) == before
    assert pool.allocate(0) == []


def test_reference_counting() -> None:
    pool, _ = make_pool(5)
    [block_id] = pool.allocate(1)
    assert pool.ref_count(block_id) == 1
    pool.ref(block_id)
    pool.ref(block_id)
    assert pool.ref_count(block_id) == 3
    assert counts(pool) == (1, 0, 3)
    pool.free(block_id)
    pool.free(block_id)
    assert pool.ref_count(block_id) == 1
    assert block_id not in pool.free_block_ids()  # still referenced: never allocatable
    pool.free(block_id)
    assert pool.ref_count(block_id) == 0
    assert pool.free_block_ids()[0] == block_id  # uncached: reused first, nothing of value lost
    assert counts(pool) == (0, 0, 4)
    with pytest.raises(InvalidArgument, match="double free"):
        pool.free(block_id)


def test_counts_follow_publish_free_and_evict() -> None:
    pool, evicted = make_pool(5)
    block_ids = pool.allocate(2)
    block_hash = publish(pool, block_ids[0])
    assert counts(pool) == (2, 0, 2)
    for block_id in block_ids:
        pool.free(block_id)
    assert counts(pool) == (0, 1, 3)  # the published one stays cached, the other is plain free
    assert pool.block_hash(block_ids[0]) == block_hash
    pool.allocate(4)
    assert evicted == [(block_hash, block_ids[0])]
    assert pool.block_hash(block_ids[0]) is None and pool.token_ids(block_ids[0]) is None
    assert counts(pool) == (4, 0, 0)


def test_lru_evicts_least_recently_freed_first() -> None:
    pool, evicted = make_pool(5)
    block_ids = pool.allocate(4)
    hashes = {block_id: publish(pool, block_id) for block_id in block_ids}
    free_order = [3, 1, 4, 2]
    for block_id in free_order:
        pool.free(block_id)
    assert pool.free_block_ids() == free_order
    assert pool.allocate(1) == [3]
    assert pool.allocate(1) == [1]
    assert evicted == [(hashes[3], 3), (hashes[1], 1)]


def test_hit_on_cached_block_pulls_it_out_of_the_free_list() -> None:
    pool, evicted = make_pool(5)
    for block_id in pool.allocate(4):
        publish(pool, block_id)
    for block_id in (1, 2, 3, 4):
        pool.free(block_id)
    pool.ref(2)  # a prefix hit on an unreferenced cached block
    assert pool.free_block_ids() == [1, 3, 4]
    assert counts(pool) == (1, 3, 0)
    assert pool.allocate(3) == [1, 3, 4]
    assert [block_id for _, block_id in evicted] == [1, 3, 4]
    pool.free(2)
    assert pool.free_block_ids() == [2]  # back at the tail, still cached
    assert counts(pool) == (3, 1, 0)


def test_bad_arguments() -> None:
    with pytest.raises(InvalidArgument, match="num_blocks"):
        BlockPool(0)
    pool, _ = make_pool(3)
    with pytest.raises(InvalidArgument, match="block_id"):
        pool.ref(3)
    with pytest.raises(InvalidArgument, match="not referenced"):
        pool.set_hash(1, b"h" * 16, (1,))  # unreferenced blocks are never published
    [block_id] = pool.allocate(1)
    publish(pool, block_id)
    with pytest.raises(InvalidArgument, match="already published"):
        publish(pool, block_id)


def test_reset_forgets_everything_without_reporting_evictions() -> None:
    pool, evicted = make_pool(5)
    for block_id in pool.allocate(3):
        publish(pool, block_id)
    pool.free(1)
    pool.reset()
    assert counts(pool) == (0, 0, 4)
    assert pool.free_block_ids() == [1, 2, 3, 4]
    assert evicted == []
