"""Eviction policies: a workload each of LRU and LFU wins, LRU's order unchanged, LFU's ageing, the
pool's invariants under random operations with either policy, and `--kv-eviction` end to end."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from services.scheduler.block_manager import BlockManager
from services.scheduler.block_pool import BlockPool
from services.scheduler.config import parse_config
from services.scheduler.eviction import EVICTION_POLICIES, LfuPolicy
from services.scheduler.fleet import FleetConfig
from services.scheduler.router import PoolConfig
from shared.config import ConfigError
from shared.errors import InvalidArgument
from tests.inprocess import BLOCK_SIZE as STACK_BLOCK_SIZE, Stack
from tests.scheduler.test_service import collect, greedy_request

BLOCK_SIZE = 4


def prompt(prefix_id: int, num_blocks: int = 2) -> list[int]:
    """A prompt of whole blocks that shares nothing with any other `prefix_id`."""
    return list(range(1000 * prefix_id, 1000 * prefix_id + num_blocks * BLOCK_SIZE))


def visit(manager: BlockManager, token_ids: list[int]) -> int:
    """One request for `token_ids` from arrival to finish; returns how many of its blocks were hits."""
    hits = manager.lookup_prefix(token_ids, "")
    assert manager.allocate_slots("r", len(token_ids), hits) is not None
    manager.cache_blocks("r", token_ids, len(token_ids), "")
    manager.free("r")
    return len(hits)


# --- the workloads each policy wins -------------------------------------------------------------


@pytest.mark.parametrize("eviction, survives", [("lru", False), ("lfu", True)])
def test_a_hot_prefix_survives_a_scan_under_lfu_only(eviction: str, survives: bool) -> None:
    manager = BlockManager(9, BLOCK_SIZE, "v1", eviction=eviction)  # 8 usable blocks
    hot = prompt(0)
    for _ in range(10):  # a system prompt everyone sends
        visit(manager, hot)
    for prefix_id in range(1, 9):  # then one-off prompts: 16 blocks, twice the pool
        assert visit(manager, prompt(prefix_id)) == 0
    assert len(manager.lookup_prefix(hot, "")) == (2 if survives else 0)


def test_lfu_lets_an_old_favourite_go_once_it_has_aged() -> None:
    manager = BlockManager(9, BLOCK_SIZE, "v1", eviction="lfu")
    hot = prompt(0)
    for _ in range(10):
        visit(manager, hot)
    # 10 uses weigh log2(10) ~ 3.3 half-lives (of 9 blocks handed out each): a scan of 80 blocks outlasts them.
    for prefix_id in range(1, 41):
        visit(manager, prompt(prefix_id))
    assert manager.lookup_prefix(hot, "") == []


@pytest.mark.parametrize("eviction", EVICTION_POLICIES)
def test_lru_follows_a_shifting_working_set_sooner_than_lfu(eviction: str) -> None:
    manager = BlockManager(9, BLOCK_SIZE, "v1", eviction=eviction)
    old = [prompt(100), prompt(101)]  # 4 blocks, asked for 8 times each
    for _ in range(8):
        for token_ids in old:
            visit(manager, token_ids)
    new = [prompt(200), prompt(201), prompt(202)]  # 6 blocks: fits only once the old set goes
    hits_per_round = [sum(visit(manager, token_ids) for token_ids in new) for _ in range(12)]
    if eviction == "lru":
        assert hits_per_round == [0] + [6] * 11  # every revisit hits
    else:
        # The old favourites keep their blocks and the new set evicts itself until the old counts
        # have aged, then LFU too hits every revisit.
        assert hits_per_round[1:4] == [0, 0, 0] and hits_per_round[-4:] == [6] * 4
        assert sum(hits_per_round) < 6 * 11


# --- LRU is the free list it always was ---------------------------------------------------------


class OldFreeList:
    """The free list exactly as BlockPool kept it before it had policies: the reference for LRU."""

    def __init__(self, num_blocks: int) -> None:
        self.order: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))

    def allocate(self, num_blocks: int) -> list[int]:
        return [self.order.popitem(last=False)[0] for _ in range(num_blocks)]

    def ref(self, block_id: int, was_unreferenced: bool) -> None:
        if was_unreferenced:
            del self.order[block_id]

    def free(self, block_id: int, now_unreferenced: bool, cached: bool) -> None:
        if now_unreferenced:
            self.order[block_id] = None
            if not cached:
                self.order.move_to_end(block_id, last=False)


def churn(eviction: str, seed: int, num_ops: int, reference: OldFreeList | None = None) -> BlockPool:
    """Random allocates, prefix hits, publishes and frees on a 16-block pool; checks its invariants
    after each, and its free list against `reference` if given."""
    rng = random.Random(seed)
    evicted: list[tuple[bytes, int]] = []
    pool = BlockPool(17, eviction=eviction,
                     on_evict=lambda block_hash, block_id: evicted.append((block_hash, block_id)))
    held: list[int] = []  # one entry per reference a "request" holds
    all_ids = range(1, pool.num_blocks)
    for step in range(num_ops):
        op = rng.choice(("allocate", "allocate", "hit", "hit", "publish", "free", "free"))
        published = [b for b in all_ids if pool.block_hash(b) is not None]
        if op == "allocate":
            num_blocks = rng.randrange(min(3, pool.num_allocatable) + 1)
            expected = pool.free_block_ids()[:num_blocks]  # the order it claims is the order it takes
            expected_evictions = [(pool.block_hash(b), b) for b in expected if pool.block_hash(b) is not None]
            evicted.clear()
            block_ids = pool.allocate(num_blocks)
            assert block_ids == expected and evicted == expected_evictions
            if reference is not None:
                assert reference.allocate(num_blocks) == block_ids
            held.extend(block_ids)
        elif op == "hit" and published:
            block_id = rng.choice(published)
            was_unreferenced = pool.ref_count(block_id) == 0
            pool.ref(block_id)
            if reference is not None:
                reference.ref(block_id, was_unreferenced)
            held.append(block_id)
        elif op == "publish":
            unpublished = sorted({b for b in held if pool.block_hash(b) is None})
            if unpublished:
                block_id = rng.choice(unpublished)
                pool.set_hash(block_id, step.to_bytes(16, "little"), (step,))
        elif op == "free":
            for _ in range(min(len(held), rng.randrange(1, 4))):  # about as many out as come in
                block_id = held.pop(rng.randrange(len(held)))
                pool.free(block_id)
                if reference is not None:
                    reference.free(block_id, pool.ref_count(block_id) == 0, pool.block_hash(block_id) is not None)
        free_ids = pool.free_block_ids()
        assert pool.num_used + pool.num_cached + pool.num_free == pool.num_usable
        assert pool.num_allocatable == len(free_ids) == pool.num_free + pool.num_cached
        assert sorted(free_ids) == [b for b in all_ids if pool.ref_count(b) == 0]
        assert pool.num_used == len(set(held))
        assert all(pool.ref_count(b) == held.count(b) for b in set(held))
        cached_flags = [pool.block_hash(b) is not None for b in free_ids]
        assert cached_flags == sorted(cached_flags)  # every free block goes before any cached one
        if reference is not None:
            assert free_ids == list(reference.order)
    return pool


@pytest.mark.parametrize("seed", range(3))
def test_lru_order_is_the_old_free_list_exactly(seed: int) -> None:
    churn("lru", seed, 3000, OldFreeList(17))


@pytest.mark.parametrize("eviction", EVICTION_POLICIES)
@pytest.mark.parametrize("seed", range(3))
def test_counts_and_order_stay_consistent_under_random_operations(eviction: str, seed: int) -> None:
    pool = churn(eviction, seed, 3000)
    pool.reset()
    assert pool.free_block_ids() == list(range(1, 17)) and pool.num_free == 16


# --- LFU in the pool ----------------------------------------------------------------------------


def publish_and_free(pool: BlockPool, num_blocks: int) -> list[int]:
    block_ids = pool.allocate(num_blocks)
    for block_id in block_ids:
        pool.set_hash(block_id, bytes([block_id]) * 16, (block_id,))
    for block_id in block_ids:
        pool.free(block_id)
    return block_ids


def test_lfu_evicts_fewest_hits_first_and_breaks_ties_by_release() -> None:
    pool = BlockPool(5, eviction="lfu")
    publish_and_free(pool, 4)  # released 1, 2, 3, 4 at one tick: no hits, so LRU order
    assert pool.free_block_ids() == [1, 2, 3, 4]
    for block_id, num_hits in ((1, 3), (3, 1)):
        for _ in range(num_hits):
            pool.ref(block_id)
        for _ in range(num_hits):
            pool.free(block_id)
    assert pool.free_block_ids() == [2, 4, 3, 1]


def test_lfu_hands_out_free_blocks_before_any_cached_one() -> None:
    pool = BlockPool(5, eviction="lfu")
    publish_and_free(pool, 2)
    [plain] = pool.allocate(1)
    assert plain == 3  # never-used blocks first
    pool.free(plain)  # unpublished: free again, and ahead of every cached block
    assert pool.free_block_ids() == [3, 4, 1, 2]


def test_lfu_count_starts_over_when_a_block_is_reused() -> None:
    pool = BlockPool(4, eviction="lfu")
    publish_and_free(pool, 3)
    for _ in range(5):
        pool.ref(1)
        pool.free(1)
    assert pool.free_block_ids()[-1] == 1
    evicted = pool.allocate(3)  # all three evicted, 1 last
    assert evicted == [2, 3, 1]
    pool.set_hash(1, b"n" * 16, (9,))  # block 1 holds a new prefix now; its old hits are not its own
    for block_id in (2, 3):
        pool.set_hash(block_id, bytes([block_id]) * 16, (block_id,))
    for block_id in (1, 2, 3):
        pool.free(block_id)
    assert pool.free_block_ids() == [1, 2, 3]


def test_lfu_heap_stays_bounded_under_hit_and_release_cycles() -> None:
    policy = LfuPolicy(3)
    policy.reset([1, 2])
    policy.release(1, cached=True)
    for _ in range(10_000):  # each cycle leaves a stale entry behind; compaction must sweep them
        policy.record_hit(1)
        policy.reclaim(1)
        policy.release(1, cached=True)
    assert len(policy._heap) <= 2 * 64 + 2
    assert policy.block_ids() == [2, 1] and policy.pop() == 2 and policy.pop() == 1


# --- the flag -----------------------------------------------------------------------------------


def test_flag_and_environment_choose_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_config([]).fleet.kv_eviction == "lru"
    assert parse_config(["--kv-eviction", "lfu"]).fleet.kv_eviction == "lfu"
    monkeypatch.setenv("SWITCHYARD_KV_EVICTION", "lfu")
    assert parse_config([]).fleet.kv_eviction == "lfu"
    monkeypatch.setenv("SWITCHYARD_KV_EVICTION", "mru")  # argparse's `choices` never sees a default
    with pytest.raises(ConfigError, match="--kv-eviction / SWITCHYARD_KV_EVICTION: must be one of lru, lfu"):
        parse_config([])


def test_bad_policy_names_the_field() -> None:
    with pytest.raises(InvalidArgument, match="kv_eviction: must be one of lru, lfu, got 'mru'"):
        FleetConfig(pools=(PoolConfig("default", "v1", 1.0, ("127.0.0.1:1",)),), kv_eviction="mru")
    with pytest.raises(InvalidArgument, match="^eviction: "):
        BlockPool(5, eviction="LRU")


async def test_every_worker_of_the_fleet_gets_the_policy(tiny_model_dir) -> None:
    async with Stack(tiny_model_dir, kv_eviction="lfu", max_num_batched_tokens=2048) as stack:
        for loop in stack.fleet.loops.values():
            assert loop.batcher is not None and loop.batcher.block_manager.eviction == "lfu"
        token_ids = list(range(10, 10 + 8 * STACK_BLOCK_SIZE))
        _, first, _ = await collect(stack.stub, greedy_request("a", token_ids, 2))
        _, second, _ = await collect(stack.stub, greedy_request("b", token_ids, 2))
        assert first.num_cached_tokens == 0 and second.num_cached_tokens == 7 * STACK_BLOCK_SIZE
