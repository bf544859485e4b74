"""Block manager: prefix reuse, eviction order, atomic allocation and the count invariant under churn."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest

from services.scheduler import prefix_index
from services.scheduler.block_manager import BlockManager
from shared.errors import InvalidArgument

BLOCK_SIZE = 4


def make_manager(num_blocks: int = 9, model_version: str = "v1", **kwargs: bool) -> BlockManager:
    """`num_blocks` includes the null block, so 9 gives 8 usable blocks of 4 tokens."""
    return BlockManager(num_blocks, BLOCK_SIZE, model_version, **kwargs)


def prompt(num_tokens: int, start: int = 100) -> list[int]:
    return list(range(start, start + num_tokens))


def counts(manager: BlockManager) -> tuple[int, int, int]:
    assert (manager.num_blocks_used + manager.num_blocks_cached + manager.num_blocks_free
            == manager.num_blocks_total)
    return manager.num_blocks_used, manager.num_blocks_cached, manager.num_blocks_free


def admit(manager: BlockManager, request_id: str, token_ids: Sequence[int], cache_salt: str = "") -> list[int]:
    """What the batcher does for a whole prompt: look up, allocate with the hits, compute, publish."""
    hits = manager.lookup_prefix(token_ids, cache_salt)
    added = manager.allocate_slots(request_id, len(token_ids), hits)
    assert added is not None
    manager.cache_blocks(request_id, token_ids, len(token_ids), cache_salt)
    return added


# --- prefix reuse -------------------------------------------------------------------------------


def test_repeated_prompt_hits_its_full_blocks_while_live_and_after_free() -> None:
    manager = make_manager()
    tokens = prompt(10)  # two full blocks + a partial one
    assert manager.num_cached_prefix_tokens(tokens, "") == 0
    first = admit(manager, "a", tokens)
    assert manager.num_cached_prefix_tokens(tokens, "") == 8
    assert manager.lookup_prefix(tokens, "") == first[:2]

    second = admit(manager, "b", tokens)  # shares the live prefix: refs, not copies
    assert second[:2] == first[:2] and second[2] != first[2]
    assert counts(manager) == (4, 0, 4)

    manager.free("a")
    manager.free("b")
    assert counts(manager) == (0, 2, 6)
    assert admit(manager, "c", tokens)[:2] == first[:2]  # reused from the cache after free
    assert counts(manager) == (3, 0, 5)


def test_partial_last_block_is_never_indexed() -> None:
    manager = make_manager()
    tokens = prompt(6)
    admit(manager, "a", tokens)
    # Block 2 holds tokens 4..5 of a longer prompt that would continue the same way, but it is partial.
    assert manager.lookup_prefix(prompt(8), "") == manager.block_ids("a")[:1]
    manager.cache_blocks("a", tokens, 7, "")  # num_computed beyond the tokens known still publishes no partial
    manager.free("a")
    assert counts(manager) == (0, 1, 7)


def test_num_computed_tokens_bounds_what_is_published() -> None:
    manager = make_manager()
    tokens = prompt(12)
    manager.allocate_slots("a", 12)
    manager.cache_blocks("a", tokens, 7, "")
    assert manager.num_cached_prefix_tokens(tokens, "") == 4
    manager.cache_blocks("a", tokens, 7, "")  # idempotent
    manager.cache_blocks("a", tokens, 12, "")
    assert manager.num_cached_prefix_tokens(tokens, "") == 12
    manager.free("a")
    assert counts(manager) == (0, 3, 5)


def test_forced_hash_collision_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefix_index, "hash_block", lambda *args: b"\x01" * 16)
    manager = make_manager()
    first = admit(manager, "a", prompt(4, start=0))
    assert manager.lookup_prefix(prompt(4, start=0), "") == first
    other = prompt(4, start=50)
    assert manager.lookup_prefix(other, "") == []
    assert manager.num_cached_prefix_tokens(other, "") == 0
    second = admit(manager, "b", other)
    assert second != first
    manager.free("a")
    manager.free("b")
    assert counts(manager) == (0, 1, 7)  # the colliding block was never indexed over the first


def test_salts_never_share_and_equal_salts_do() -> None:
    manager = make_manager()
    tokens = prompt(8)
    first = admit(manager, "a", tokens, cache_salt="tenant-a")
    assert manager.lookup_prefix(tokens, "tenant-b") == []
    assert manager.lookup_prefix(tokens, "") == []
    other_salt = admit(manager, "b", tokens, cache_salt="tenant-b")
    assert set(other_salt).isdisjoint(first)
    assert manager.lookup_prefix(tokens, "tenant-b") == other_salt  # each salt gets its own cached copy
    same_salt = admit(manager, "c", tokens, cache_salt="tenant-a")
    assert same_salt == first
    assert counts(manager) == (4, 0, 4)


def test_model_versions_never_share(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each manager has its own index, so sharing could only happen through equal keys; record them.
    keys: dict[str, set[bytes]] = {"v1": set(), "v2": set()}
    real_hash_block = prefix_index.hash_block

    def recording_hash_block(parent_hash: bytes, token_ids: Sequence[int], cache_salt: str,
                             model_version: str) -> bytes:
        block_hash = real_hash_block(parent_hash, token_ids, cache_salt, model_version)
        keys[model_version].add(block_hash)
        return block_hash

    monkeypatch.setattr(prefix_index, "hash_block", recording_hash_block)
    old, new = make_manager(model_version="v1"), make_manager(model_version="v2")
    tokens = prompt(8)
    admit(old, "a", tokens)
    admit(new, "a", tokens)
    assert old.block_ids("a") == new.block_ids("a")  # same tokens in the same block ids...
    assert len(keys["v1"]) == 2 and keys["v1"].isdisjoint(keys["v2"])  # ...under different keys


def test_duplicate_prefix_keeps_the_first_mapping() -> None:
    manager = make_manager()
    tokens = prompt(8)
    # Both looked up before either published, so both computed the prefix into their own blocks.
    assert manager.allocate_slots("a", 8) is not None
    assert manager.allocate_slots("b", 8) is not None
    manager.cache_blocks("a", tokens, 8, "")
    manager.cache_blocks("b", tokens, 8, "")
    assert manager.lookup_prefix(tokens, "") == manager.block_ids("a")
    manager.free("a")
    manager.free("b")
    assert counts(manager) == (0, 2, 6)  # b's copies went back as plain free blocks
    assert manager.lookup_prefix(tokens, "") == [1, 2]


def test_prefix_caching_disabled_never_hits() -> None:
    manager = make_manager(enable_prefix_caching=False)
    tokens = prompt(8)
    admit(manager, "a", tokens)
    assert manager.lookup_prefix(tokens, "") == []
    assert manager.num_cached_prefix_tokens(tokens, "") == 0
    manager.free("a")
    assert counts(manager) == (0, 0, 8)


# --- eviction order -----------------------------------------------------------------------------


def test_least_recently_freed_cached_block_is_evicted_first() -> None:
    manager = make_manager(num_blocks=3)  # 2 usable: no plain free block to hide behind
    tokens_a, tokens_b = prompt(4, start=0), prompt(4, start=50)
    admit(manager, "a", tokens_a)
    admit(manager, "b", tokens_b)
    manager.free("a")
    manager.free("b")
    admit(manager, "c", prompt(4, start=90))
    assert manager.lookup_prefix(tokens_a, "") == []
    assert manager.num_cached_prefix_tokens(tokens_b, "") == 4


def test_cache_hit_pulls_unreferenced_block_out_of_the_free_list() -> None:
    manager = make_manager(num_blocks=4)  # 3 usable
    tokens = {name: prompt(4, start=start) for name, start in (("a", 0), ("b", 50), ("c", 80))}
    for name, token_ids in tokens.items():
        admit(manager, name, token_ids)
    for name in tokens:
        manager.free(name)
    assert counts(manager) == (0, 3, 0)
    admit(manager, "a2", tokens["a"])  # a's block was the next to be evicted; the hit saves it
    assert counts(manager) == (1, 2, 0)
    assert manager.allocate_slots("d", 8) is not None  # evicts b and c, not a
    assert manager.lookup_prefix(tokens["a"], "") == manager.block_ids("a2")
    assert manager.lookup_prefix(tokens["b"], "") == []
    assert manager.lookup_prefix(tokens["c"], "") == []


def test_tail_block_of_a_freed_table_is_evicted_before_its_head() -> None:
    manager = make_manager(num_blocks=4)  # 3 usable, all taken by one prompt
    tokens = prompt(12)
    admit(manager, "a", tokens)
    manager.free("a")
    assert manager.num_cached_prefix_tokens(tokens, "") == 12
    admit(manager, "x", prompt(4, start=0))
    assert manager.num_cached_prefix_tokens(tokens, "") == 8
    admit(manager, "y", prompt(4, start=50))
    assert manager.num_cached_prefix_tokens(tokens, "") == 4


# --- allocation ---------------------------------------------------------------------------------


def test_allocate_slots_extends_and_returns_only_added_blocks() -> None:
    manager = make_manager()
    first = manager.allocate_slots("a", 5)
    assert first is not None and len(first) == 2
    assert manager.allocate_slots("a", 8) == []  # still fits in the second block
    third = manager.allocate_slots("a", 9)
    assert third is not None and len(third) == 1
    assert manager.block_ids("a") == first + third
    assert manager.allocate_slots("b", 0) == []
    assert manager.block_ids("b") == [] and manager.block_ids("unknown") == []


def test_allocate_slots_returns_prefix_blocks_first_in_table_order() -> None:
    manager = make_manager()
    tokens = prompt(8)
    first = admit(manager, "a", tokens)
    added = manager.allocate_slots("b", 13, manager.lookup_prefix(tokens, ""))
    assert added is not None and added[:2] == first and len(added) == 4
    assert manager.block_ids("b") == added


def test_allocate_slots_when_short_returns_none_and_changes_nothing() -> None:
    manager = make_manager(num_blocks=5)  # 4 usable
    tokens = prompt(8)
    admit(manager, "a", tokens)
    manager.free("a")  # 2 cached, 2 free
    assert manager.allocate_slots("b", 4) is not None  # 1 used, 2 cached, 1 free
    before = counts(manager)
    hits = manager.lookup_prefix(tokens, "")
    assert len(hits) == 2
    # The two hits come off the free list too, so 2 hits + 1 fresh > the 3 allocatable blocks.
    assert manager.can_allocate(3) and not manager.can_allocate(4)
    assert manager.allocate_slots("c", 16, hits) is None
    assert manager.allocate_slots("b", 20) is None
    assert counts(manager) == before
    assert manager.block_ids("c") == []
    assert len(manager.block_ids("b")) == 1
    assert manager.lookup_prefix(tokens, "") == hits  # nothing was evicted by the failed attempts
    assert manager.allocate_slots("c", 12, hits) is not None  # exactly enough works


def test_free_of_unknown_request_is_a_no_op() -> None:
    manager = make_manager()
    admit(manager, "a", prompt(6))
    assert counts(manager) == (2, 0, 6)
    manager.free("nobody")
    assert counts(manager) == (2, 0, 6)
    manager.free("a")
    manager.free("a")  # a second free is as unknown as any other id
    assert counts(manager) == (0, 1, 7)


def test_reset_forgets_tables_refs_and_index() -> None:
    manager = make_manager()
    tokens = prompt(8)
    admit(manager, "a", tokens)
    admit(manager, "b", prompt(8, start=0))
    manager.free("b")
    manager.reset()
    assert counts(manager) == (0, 0, 8)
    assert manager.block_ids("a") == []
    assert manager.lookup_prefix(tokens, "") == []


def test_bad_arguments() -> None:
    manager = make_manager()
    with pytest.raises(InvalidArgument, match="num_tokens"):
        manager.allocate_slots("a", -1)
    with pytest.raises(InvalidArgument, match="prefix_block_ids"):
        manager.allocate_slots("a", 4, [0])
    with pytest.raises(InvalidArgument, match="prefix_block_ids"):
        manager.allocate_slots("a", 8, [1, 1])
    with pytest.raises(InvalidArgument, match="block_size"):
        BlockManager(9, 0, "v1")
    assert counts(manager) == (0, 0, 8)


# --- randomized churn ---------------------------------------------------------------------------


def test_counts_and_prefix_hits_stay_right_under_random_churn() -> None:
    rng = random.Random(1234)
    manager = make_manager(num_blocks=33)
    salts = ["", "s"]
    live: dict[str, tuple[list[int], str]] = {}  # request id -> (tokens it owns so far, salt)
    # What each block truly holds: (salt, the whole prefix up to its end); set when a request computes it.
    contents: dict[int, tuple[str, tuple[int, ...]]] = {}
    next_id = 0

    # A tiny alphabet plus a few shared stems, so prompts share prefixes (and nearly share them) often.
    stems = [[rng.randrange(2) for _ in range(16)] for _ in range(3)]

    def random_tokens(max_len: int) -> list[int]:
        head = rng.choice(stems)[:rng.randrange(17)] if rng.random() < 0.7 else []
        tail = [rng.randrange(2) for _ in range(rng.randrange(max_len + 1))]
        return (head + tail)[:max_len]

    def check_lookup(token_ids: list[int], cache_salt: str) -> list[int]:
        hits = manager.lookup_prefix(token_ids, cache_salt)
        assert manager.num_cached_prefix_tokens(token_ids, cache_salt) == len(hits) * BLOCK_SIZE
        for i, block_id in enumerate(hits):
            assert contents[block_id] == (cache_salt, tuple(token_ids[:(i + 1) * BLOCK_SIZE]))
        return hits

    def check_invariants() -> None:
        counts(manager)
        refs = Counter(block_id for rid in live for block_id in manager.block_ids(rid))
        assert 0 not in refs
        assert manager.num_blocks_used == len(refs)
        for rid in live:
            assert len(set(manager.block_ids(rid))) == len(manager.block_ids(rid))

    for _ in range(2000):
        op = rng.choice(["allocate", "allocate", "extend", "cache", "cache", "free", "free", "lookup"])
        if op == "allocate":
            rid, next_id = f"r{next_id}", next_id + 1
            token_ids, salt = random_tokens(24), rng.choice(salts)
            before = counts(manager)
            hits = check_lookup(token_ids[:-1], salt)
            added = manager.allocate_slots(rid, len(token_ids), hits)
            if added is None:
                assert counts(manager) == before and manager.block_ids(rid) == []
            else:
                assert added[:len(hits)] == hits
                for block_id in added[len(hits):]:
                    contents.pop(block_id, None)  # fresh (maybe evicted): its old KV is gone
                live[rid] = (token_ids, salt)
        elif op == "extend" and live:
            rid = rng.choice(sorted(live))
            token_ids, _ = live[rid]
            before_blocks, before = manager.block_ids(rid), counts(manager)
            more = random_tokens(8)
            added = manager.allocate_slots(rid, len(token_ids) + len(more))
            if added is None:
                assert counts(manager) == before and manager.block_ids(rid) == before_blocks
            else:
                assert manager.block_ids(rid) == before_blocks + added
                for block_id in added:
                    contents.pop(block_id, None)
                token_ids.extend(more)
        elif op == "cache" and live:
            rid = rng.choice(sorted(live))
            token_ids, salt = live[rid]
            num_computed = rng.randrange(len(token_ids) + 1)
            manager.cache_blocks(rid, token_ids, num_computed, salt)
            for i, block_id in enumerate(manager.block_ids(rid)[:num_computed // BLOCK_SIZE]):
                contents[block_id] = (salt, tuple(token_ids[:(i + 1) * BLOCK_SIZE]))
        elif op == "free":
            rid = rng.choice(sorted(live)) if live and rng.random() < 0.9 else "unknown"
            manager.free(rid)
            live.pop(rid, None)
        else:
            check_lookup(random_tokens(24), rng.choice(salts))
        check_invariants()

    for rid in list(live):
        manager.free(rid)
        del live[rid]
        check_invariants()
    assert manager.num_blocks_used == 0
    assert manager.num_blocks_cached + manager.num_blocks_free == manager.num_blocks_total
