"""Block pool: reference counts and the free list of one worker's KV blocks.

The scheduler owns the worker's block table, so this pool is the single source of truth for which
physical blocks are in use. A block whose last user went away may still hold KV for a published
prefix ("cached"); it stays where it is until the pool actually needs the space, so a later request
with the same prefix can skip its prefill. When space is needed, a block that holds nothing goes
first, then the cached block the eviction policy (services/scheduler/eviction.py) gives up: under
`lru` the least recently freed, a prefix nobody has touched for longest being the one least likely
to be asked for again; under `lfu` the one with the fewest recent hits.

Block 0 is the null block the worker pads block tables with; it never holds real KV, so it is never
on the free list and can never be handed out.

The pool knows nothing of hashing. When allocation takes a cached block, `on_evict(block_hash,
block_id)` fires before the block is handed out, so the owner's prefix index can drop the entry at
the exact moment the KV behind it stops being valid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from services.scheduler.eviction import DEFAULT_EVICTION, new_policy
from shared.errors import InvalidArgument, ResourceExhausted

NULL_BLOCK_ID = 0

EvictCallback = Callable[[bytes, int], None]


class BlockPool:
    """Ref counts, optional (hash, tokens) per block, and a free list ordered by the eviction policy
    (`lru`: O(1) updates; `lfu`: O(log n))."""

    def __init__(self, num_blocks: int, *, on_evict: EvictCallback | None = None,
                 eviction: str = DEFAULT_EVICTION) -> None:
        if num_blocks < 1:
            raise InvalidArgument(f"must be >= 1 (block 0 is the reserved null block), got {num_blocks}",
                                  field="num_blocks")
        self.num_blocks = num_blocks
        self.eviction = eviction
        self._on_evict = on_evict
        self._free = new_policy(eviction, num_blocks)
        self.reset()

    def reset(self) -> None:
        """Every usable block unreferenced and unhashed; nothing is reported evicted (the owner clears its index)."""
        self._ref_counts: list[int] = [0] * self.num_blocks
        self._block_hashes: list[bytes | None] = [None] * self.num_blocks
        self._token_ids: list[tuple[int, ...] | None] = [None] * self.num_blocks
        self._free.reset(range(1, self.num_blocks))
        # Counters kept incrementally so stats never scan the pool.
        self._num_used = 0
        self._num_cached = 0

    # --- counts ---------------------------------------------------------------------------------

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one live request."""
        return self._num_used

    @property
    def num_cached(self) -> int:
        """Unreferenced blocks still holding a published prefix (evictable)."""
        return self._num_cached

    @property
    def num_free(self) -> int:
        """Unreferenced blocks holding nothing anyone can look up."""
        return self.num_usable - self._num_used - self._num_cached

    @property
    def num_allocatable(self) -> int:
        """Blocks `allocate` can hand out right now: free plus evictable cached."""
        return len(self._free)

    # --- per-block state ------------------------------------------------------------------------

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> bytes | None:
        self._check_id(block_id)
        return self._block_hashes[block_id]

    def token_ids(self, block_id: int) -> tuple[int, ...] | None:
        self._check_id(block_id)
        return self._token_ids[block_id]

    def free_block_ids(self) -> list[int]:
        """The free list in eviction order (next to be allocated first). O(n); for stats and tests."""
        return self._free.block_ids()

    # --- transitions ----------------------------------------------------------------------------

    def allocate(self, num_blocks: int) -> list[int]:
        """Takes `num_blocks` blocks from the free-list head, each with ref_count 1, evicting cached ones
        (free ones first, then the cached ones in the policy's order)."""
        if num_blocks < 0:
            raise InvalidArgument(f"must be >= 0, got {num_blocks}", field="num_blocks")
        if num_blocks > len(self._free):
            # All or nothing: a half-done allocation would leave the caller owning blocks it cannot use.
            raise ResourceExhausted(f"num_blocks: {num_blocks} requested, {len(self._free)} allocatable",
                                    retry_after_s=0.0, field="num_blocks")
        block_ids: list[int] = []
        for _ in range(num_blocks):
            block_id = self._free.pop()
            block_hash = self._block_hashes[block_id]
            if block_hash is not None:
                self._num_cached -= 1
                self._block_hashes[block_id] = None
                self._token_ids[block_id] = None
                if self._on_evict is not None:
                    self._on_evict(block_hash, block_id)
            self._ref_counts[block_id] = 1
            self._num_used += 1
            block_ids.append(block_id)
        return block_ids

    def ref(self, block_id: int) -> None:
        """One more user of `block_id`; a cache hit on an unreferenced block pulls it off the free list.

        Callers ref a published block only through a prefix-cache match, so that is what LFU counts."""
        self._check_usable(block_id)
        if self._block_hashes[block_id] is not None:
            self._free.record_hit(block_id)
        if self._ref_counts[block_id] == 0:
            self._free.reclaim(block_id)
            self._num_used += 1
            if self._block_hashes[block_id] is not None:
                self._num_cached -= 1
        self._ref_counts[block_id] += 1

    def free(self, block_id: int) -> None:
        """One user fewer; at zero a cached block joins the free list where the policy puts it, an
        uncached one the head (reused first: evicting it loses nothing)."""
        self._check_usable(block_id)
        if self._ref_counts[block_id] == 0:
            raise InvalidArgument(f"block {block_id} is not referenced (double free)", field="block_id")
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            cached = self._block_hashes[block_id] is not None
            self._free.release(block_id, cached)
            self._num_used -= 1
            if cached:
                self._num_cached += 1

    def set_hash(self, block_id: int, block_hash: bytes, token_ids: Sequence[int]) -> None:
        """Marks a referenced block as published under `block_hash` (so it stays cached when freed)."""
        self._check_usable(block_id)
        # Only live blocks get published: an unreferenced one could be evicted under the caller's feet,
        # and allowing it would need extra bookkeeping for a case no caller has.
        if self._ref_counts[block_id] == 0:
            raise InvalidArgument(f"block {block_id} is not referenced", field="block_id")
        if self._block_hashes[block_id] is not None:
            raise InvalidArgument(f"block {block_id} is already published", field="block_id")
        self._block_hashes[block_id] = block_hash
        self._token_ids[block_id] = tuple(token_ids)

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise InvalidArgument(f"{block_id} is outside 0..{self.num_blocks - 1}", field="block_id")

    def _check_usable(self, block_id: int) -> None:
        self._check_id(block_id)
        if block_id == NULL_BLOCK_ID:
            raise InvalidArgument("the null block 0 is never referenced", field="block_id")


class TierCounts:
    """The counts a cache tier reports (GetStats, metrics, invariants), read from its `_pool`;
    block 0 is never counted. free + cached + used = total, always."""

    _pool: BlockPool

    @property
    def num_blocks_total(self) -> int:
        return self._pool.num_usable

    @property
    def num_blocks_used(self) -> int:
        return self._pool.num_used

    @property
    def num_blocks_cached(self) -> int:
        return self._pool.num_cached

    @property
    def num_blocks_free(self) -> int:
        return self._pool.num_free
