"""Host tier (L2): the scheduler's exact mirror of one worker's KV blocks in host memory.

The device pool (L1) is where attention reads; the host tier only keeps copies. When the device
pool evicts a cached block (allocation reached it on the free list), the block manager asks this
tier to `keep` it: a host block is allocated (evicting the host tier's own least valuable block),
indexed under the same hash-chain key, and the pair (device block, host block) becomes a copy the
next step makes before anything else. A later prompt whose prefix continues in this tier past its
device hits gets fresh device blocks and (host block, device block) copies instead of a prefill.

Host blocks are never held by requests: between plans every host block is free or cached. A block
is referenced ("pinned") only while the plan that copies it is being built: a copy's source or
destination must not be handed to another copy in the same step (the worker makes all copies down,
then all copies up, so a block written twice, or read up after a second write, would be wrong).
`release` unpins a plan's blocks when the plan takes its copies. Steps run in order, so a host
block written by one step's copy is never read before it holds what the index says.

Keys are the device tier's (same model version, salt and chain), so one lookup chain serves both.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.scheduler.block_pool import BlockPool, TierCounts
from services.scheduler.eviction import DEFAULT_EVICTION
from services.scheduler.prefix_index import PrefixIndex


class HostTier(TierCounts):
    """Host-memory block pool and prefix index of one worker; pure bookkeeping, no I/O.
    Its `num_blocks_used` are the blocks pinned by a plan being built: 0 between steps."""

    def __init__(self, num_blocks: int, block_size: int, model_version: str, eviction: str = DEFAULT_EVICTION) -> None:
        self._index = PrefixIndex(block_size, model_version)
        # The device pool's policy (a copy up counts as a hit on the host block).
        self._pool = BlockPool(num_blocks, on_evict=self._index.remove, eviction=eviction)
        self._pinned: list[int] = []  # sources and destinations of the plan being built's copies
    # --- lookups ----------------------------------------------------------------------------------

    def match(self, token_ids: Sequence[int], cache_salt: str, keys: Sequence[bytes], start_block: int) -> list[int]:
        """Host block ids holding the full blocks `start_block`, `start_block + 1`, ... of
        `token_ids` (the continuation of a device-tier match), up to the first miss. `keys` are the
        prompt's `block_keys`. Token-compared like the device index; no pins, order untouched."""
        return self._index.match(token_ids, cache_salt, keys, start_block)

    def entry(self, block_id: int) -> tuple[bytes, tuple[int, ...], str]:
        """(key, token_ids, cache_salt) of a cached host block, to publish its copy in the device tier."""
        block_hash = self._pool.block_hash(block_id)
        found = self._index.entry(block_hash) if block_hash is not None else None
        assert found is not None and found[0] == block_id, f"host block {block_id} holds nothing"
        return block_hash, found[1], found[2]

    # --- transitions ------------------------------------------------------------------------------

    def keep(self, block_hash: bytes, token_ids: Sequence[int], cache_salt: str) -> int | None:
        """The host block that will receive an evicted device block's K/V, or None: already kept
        here (it was copied up earlier, or down before), or every host block is pinned."""
        if block_hash in self._index:
            block_id = self._index.get(block_hash, token_ids, cache_salt)
            if block_id is not None:
                self.pin([block_id])  # a use: it moves to the end of the eviction order
                self.unpin([block_id])
            return None
        if self._pool.num_allocatable == 0:
            return None
        [block_id] = self._pool.allocate(1)
        self._pool.set_hash(block_id, block_hash, token_ids)
        self._index.insert(block_hash, block_id, token_ids, cache_salt)
        self._pinned.append(block_id)  # cached (indexed, unreferenced) once the plan takes its copies
        return block_id

    def release(self) -> None:
        """The plan took its copies: its destinations may be evicted by the next one."""
        self.unpin(self._pinned)
        self._pinned.clear()

    def pin(self, block_ids: Sequence[int]) -> None:
        for block_id in block_ids:
            self._pool.ref(block_id)

    def pin_for_plan(self, block_ids: Sequence[int]) -> None:
        """Sources of the plan's copies up: pinned until `release`, so no copy down in the same
        step overwrites them before they are read."""
        self.pin(block_ids)
        self._pinned.extend(block_ids)

    def unpin(self, block_ids: Sequence[int]) -> None:
        for block_id in block_ids:
            self._pool.free(block_id)

    def reset(self) -> None:
        """The worker restarted: its host memory is gone too."""
        self._index.clear()
        self._pool.reset()
        self._pinned.clear()
