"""Block manager: the scheduler's exact mirror of one worker's KV pool.

The worker never chooses blocks; every step names them. So the scheduler can answer "how much of
this prompt is already cached on worker W" exactly, from its own state, with no cache events and no
approximate radix tree: the router asks `num_cached_prefix_tokens`, the batcher asks
`lookup_prefix` and `allocate_slots`, and after each step `cache_blocks` publishes the blocks that
became full and computed.

Lifecycle of a block: free -> used (allocated or hit) -> published (indexed) -> freed by its last
user, when it stays cached on the free list until the eviction policy (`lru` or `lfu`, see
services/scheduler/eviction.py) gives it up to an allocation. Freeing a table puts its last block on
the list first, so a prefix is evicted from its tail inwards and its head (shared by the most
prompts) survives longest; under `lfu` too, since every hit on a block is a hit on the blocks
before it, and equal counts go in release order.

With a host tier (`num_host_blocks`, the worker's `--kv-host-cache-mib`), eviction from the device
pool is not the end of a block: its K/V is copied down to the host tier (`host_tier.py`), and a
prompt whose prefix continues there gets device blocks filled by copies up instead of a prefill.
The copies a plan needs accumulate here while the plan is built and `take_copies` hands them to it.

With `enable_prefix_caching=False` nothing is ever indexed or found; allocation is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.scheduler.block_pool import NULL_BLOCK_ID, BlockPool, TierCounts
from services.scheduler.eviction import DEFAULT_EVICTION
from services.scheduler.host_tier import HostTier
from services.scheduler.prefix_index import ROOT_HASH, PrefixIndex
from shared.errors import InvalidArgument


@dataclass(slots=True)
class _Table:
    block_ids: list[int]
    # How many leading blocks cache_blocks has already handled, and the chain hash after them,
    # so each call hashes only the blocks that are new since the last one.
    num_published_blocks: int = 0
    parent_hash: bytes = ROOT_HASH


class BlockManager(TierCounts):
    """Block tables of the live requests on one worker, over a BlockPool and a PrefixIndex."""

    def __init__(self, num_blocks: int, block_size: int, model_version: str,
                 enable_prefix_caching: bool = True, num_host_blocks: int = 0,
                 eviction: str = DEFAULT_EVICTION) -> None:
        if block_size < 1:
            raise InvalidArgument(f"must be >= 1, got {block_size}", field="block_size")
        if num_host_blocks < 0:
            raise InvalidArgument(f"must be >= 0, got {num_host_blocks}", field="num_host_blocks")
        self.block_size = block_size
        self.model_version = model_version
        self.enable_prefix_caching = enable_prefix_caching
        self.eviction = eviction  # every pool of this worker's blocks evicts by the same policy
        self._index = PrefixIndex(block_size, model_version)
        self._pool = BlockPool(num_blocks, on_evict=self._evicted, eviction=eviction)
        self._tables: dict[str, _Table] = {}
        # A tier with only its reserved block holds nothing; without prefix caching nothing is kept.
        self.host = (HostTier(num_host_blocks, block_size, model_version, eviction)
                     if num_host_blocks >= 2 and enable_prefix_caching else None)
        self._copies_to_host: list[tuple[int, int]] = []  # (device block, host block), for the next plan
        self._copies_to_device: list[tuple[int, int]] = []  # (host block, device block)

    # --- prefix lookups (read-only) -------------------------------------------------------------

    def num_cached_prefix_tokens(self, token_ids: Sequence[int], cache_salt: str) -> int:
        """Tokens of the longest cached full-block prefix; exact, takes no refs (the router's overlap)."""
        return len(self.lookup_prefix(token_ids, cache_salt)) * self.block_size

    def lookup_prefix(self, token_ids: Sequence[int], cache_salt: str,
                      keys: Sequence[bytes] | None = None) -> list[int]:
        """Block ids of the longest cached full-block prefix; no refs taken, eviction order untouched
        (a router's look is not a hit).
        `keys` are this prompt's `block_keys`, when the caller already has them."""
        if not self.enable_prefix_caching:
            return []
        return self._index.match(token_ids, cache_salt, keys)

    def lookup_host_prefix(self, token_ids: Sequence[int], cache_salt: str, keys: Sequence[bytes],
                           num_device_blocks: int) -> list[int]:
        """Host block ids continuing a device-tier match of `num_device_blocks` blocks; [] without a tier."""
        if self.host is None:
            return []
        return self.host.match(token_ids, cache_salt, keys, num_device_blocks)

    def block_keys(self, token_ids: Sequence[int], cache_salt: str) -> list[bytes]:
        """Prefix-index keys of every full block of `token_ids`; empty with prefix caching off."""
        if not self.enable_prefix_caching:
            return []
        return self._index.chain(token_ids, cache_salt)

    # --- allocation -----------------------------------------------------------------------------

    def can_allocate(self, num_blocks: int) -> bool:
        return self._pool.num_allocatable >= num_blocks

    def allocate_slots(self, request_id: str, num_tokens: int, prefix_block_ids: Sequence[int] = (),
                       host_block_ids: Sequence[int] = ()) -> list[int] | None:
        """Makes `request_id` own blocks for its first `num_tokens` tokens; returns the ids added, or None.

        `prefix_block_ids` (device hits) and `host_block_ids` (host hits continuing them, from
        `lookup_host_prefix`) only count on the request's first call (later calls extend the table).
        Each host hit gets the next fresh device block and a copy up in the next plan; that block is
        indexed at once, since the copy runs before the step that reads it.
        None means not enough blocks, and then nothing at all has changed.
        """
        if num_tokens < 0:
            raise InvalidArgument(f"must be >= 0, got {num_tokens}", field="num_tokens")
        table = self._tables.get(request_id)
        if table is not None and num_tokens <= len(table.block_ids) * self.block_size:
            return []  # most decode steps: the last block still has room
        prefix = list(prefix_block_ids) if table is None else []
        host_hits = list(host_block_ids) if table is None and self.host is not None else []
        self._check_prefix(prefix)
        num_owned = len(prefix) + (len(table.block_ids) if table is not None else 0)
        num_new = max(0, -(-num_tokens // self.block_size) - num_owned)
        # A hit on an unreferenced cached block takes it off the free list, so it competes with the
        # fresh blocks for the same allocatable supply.
        num_revived = sum(1 for block_id in prefix if self._pool.ref_count(block_id) == 0)
        if num_new + num_revived > self._pool.num_allocatable:
            return None
        # Ref the prefix before allocating so eviction cannot take the very blocks being reused,
        # and pin the host hits (until the plan takes its copies) so no copy down in the same step
        # overwrites them.
        for block_id in prefix:
            self._pool.ref(block_id)
        if host_hits:
            self.host.pin_for_plan(host_hits)
        fresh = self._pool.allocate(num_new)
        if host_hits:
            self._copy_up(host_hits, fresh[:len(host_hits)])
        added = prefix + fresh
        if table is None:
            table = self._tables[request_id] = _Table([])
            self._skip_published_prefix(table, added)
        table.block_ids.extend(added)
        return added

    def take_copies(self) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
        """(copies to host, copies to device) made necessary since the last call: the plan being
        built carries them, and the worker makes them before its forward pass."""
        taken = tuple(self._copies_to_host), tuple(self._copies_to_device)
        self._copies_to_host.clear()
        self._copies_to_device.clear()
        if self.host is not None:
            self.host.release()
        return taken

    def _copy_up(self, host_block_ids: Sequence[int], device_block_ids: Sequence[int]) -> None:
        assert self.host is not None
        for host_block_id, device_block_id in zip(host_block_ids, device_block_ids):
            block_hash, token_ids, cache_salt = self.host.entry(host_block_id)
            if self._index.insert(block_hash, device_block_id, token_ids, cache_salt):
                self._pool.set_hash(device_block_id, block_hash, token_ids)
            self._copies_to_device.append((host_block_id, device_block_id))

    def _evicted(self, block_hash: bytes, block_id: int) -> None:
        """The device pool hands a cached block to a new owner: unindex it and, with a host tier,
        keep its K/V there (the copy rides in the plan being built, before the new owner writes)."""
        entry = self._index.pop(block_hash, block_id)
        if entry is None or self.host is None:
            return
        token_ids, cache_salt = entry
        host_block_id = self.host.keep(block_hash, token_ids, cache_salt)
        if host_block_id is not None:
            self._copies_to_host.append((block_id, host_block_id))

    def block_ids(self, request_id: str) -> list[int]:
        table = self._tables.get(request_id)
        return list(table.block_ids) if table is not None else []

    # --- publishing -----------------------------------------------------------------------------

    def has_unpublished_block(self, request_id: str, num_computed_tokens: int) -> bool:
        """Whether `cache_blocks` would index anything now (a block filled since the last call)."""
        table = self._tables.get(request_id)
        return (table is not None and self.enable_prefix_caching
                and min(num_computed_tokens // self.block_size, len(table.block_ids)) > table.num_published_blocks)

    def cache_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int,
                     cache_salt: str) -> None:
        """Indexes the request's full blocks within its first `num_computed_tokens` (idempotent).

        If another block already holds an equal prefix, that mapping stays and this block stays
        unindexed: it is freed as plain free space and never displaces a block others may share.
        """
        table = self._tables.get(request_id)
        if table is None or not self.enable_prefix_caching:
            return
        size = self.block_size
        num_full = min(num_computed_tokens, len(token_ids)) // size
        num_full = min(num_full, len(table.block_ids))
        for i in range(table.num_published_blocks, num_full):
            block_tokens = tuple(token_ids[i * size:(i + 1) * size])
            block_hash = self._index.hash_of(table.parent_hash, block_tokens, cache_salt)
            block_id = table.block_ids[i]
            if self._pool.block_hash(block_id) is None and self._index.insert(
                    block_hash, block_id, block_tokens, cache_salt):
                self._pool.set_hash(block_id, block_hash, block_tokens)
            table.parent_hash = block_hash
            table.num_published_blocks = i + 1

    # --- release --------------------------------------------------------------------------------

    def free(self, request_id: str) -> None:
        """Drops the request's refs, last block first, so a prefix's tail is evicted before its head."""
        table = self._tables.pop(request_id, None)
        if table is None:
            return
        for block_id in reversed(table.block_ids):
            self._pool.free(block_id)

    def free_tail(self, request_id: str, num_tokens: int) -> None:
        """Drops the request's blocks past its first `num_tokens` tokens, last first: the slots of
        rejected draft tokens (speculative decoding). The worker trims its table by the same rule."""
        table = self._tables.get(request_id)
        if table is None:
            return
        num_kept = -(-num_tokens // self.block_size)  # published blocks lie within num_tokens
        while len(table.block_ids) > num_kept:
            self._pool.free(table.block_ids.pop())

    def reset(self) -> None:
        """Forgets every table, ref and index entry: the worker restarted with an empty KV pool."""
        self._tables.clear()
        self._index.clear()
        self._pool.reset()
        self._copies_to_host.clear()
        self._copies_to_device.clear()
        if self.host is not None:
            self.host.reset()

    # --- helpers --------------------------------------------------------------------------------

    def _check_prefix(self, prefix: list[int]) -> None:
        if len(set(prefix)) != len(prefix):
            raise InvalidArgument(f"duplicate block ids in {prefix}", field="prefix_block_ids")
        for block_id in prefix:
            if not NULL_BLOCK_ID < block_id < self._pool.num_blocks:
                raise InvalidArgument(f"{block_id} is not a usable block id", field="prefix_block_ids")

    def _skip_published_prefix(self, table: _Table, prefix: list[int]) -> None:
        # Prefix hits are already indexed under this very chain; starting cache_blocks after them
        # saves re-hashing the shared part of every prompt. Stop at the first unpublished block.
        for block_id in prefix:
            block_hash = self._pool.block_hash(block_id)
            if block_hash is None:
                return
            table.parent_hash = block_hash
            table.num_published_blocks += 1
