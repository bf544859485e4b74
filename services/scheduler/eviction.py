"""Eviction policy: which unreferenced block a block pool hands out next.

A pool's unreferenced blocks are of two kinds. Free ones hold nothing anyone can look up, so
reusing one loses nothing: every policy hands those out first, the most recently freed first.
Cached ones hold a published prefix a later request may hit; the policies differ only in which of
those they give up when no free block is left:

- `lru`: the one released longest ago. O(1) per operation. Right when what was asked for lately is
  what will be asked for next, and the working set shifts over time.
- `lfu`: the one with the fewest recent hits (a hit: a request referencing the block through a
  prefix-cache match), ties to the one released longest ago. O(log n) per operation. Right when a
  few prefixes (system prompts) are asked for again and again between scans of one-off prompts,
  which under LRU push the hot prefixes out.

LFU ages its counts, or a prefix that was hot once would hold its blocks forever. Each hit, and the
block's last release, weighs 2^(-age / half-life), where age is counted in ticks of the policy's own
clock, which advances once per block handed out: age is the pressure the pool has been under since,
needs no wall clock, and does not pass while the pool is idle or only serving hits. Hits do not move
the clock, so the blocks of one prefix match get equal weights, and since every hit on a block is a
hit on the blocks before it, a prefix's head never ranks below its tail (which the block manager
frees first, so equal ranks still evict the tail first). Comparing
`sum(2^(-age_i / half-life))` of two blocks at any common time is the same as comparing the
time-invariant `log2(sum(2^(tick_i / half-life)))`, so each block's priority is fixed when it is
released, and a min-heap with lazy deletion orders the cached blocks without ever re-keying them.
With its hits close together, a block's priority is `log2(1 + hits) + last_release_tick / half-life`.

The half-life is the pool's size in ticks: a hit counts half as much once a whole pool's worth of
blocks has been handed out since. So a block with `h` recent hits outlives blocks nobody hit for
about `log2(1 + h)` turnovers of the pool: a hot prefix survives a scan several times the pool's
size, while a favourite nobody asks for any more fades within a few turnovers instead of never.
A shorter half-life is LRU in all but name; a longer one lets a working set that moved on hold
space for long after.

Policies are pure and synchronous; the pool tells them every transition of an unreferenced block.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Iterable
from typing import Protocol

from shared.errors import InvalidArgument

EVICTION_POLICIES = ("lru", "lfu")
DEFAULT_EVICTION = "lru"


class EvictionPolicy(Protocol):
    """The order of a pool's unreferenced blocks; the pool keeps ref counts and hashes itself."""

    def reset(self, block_ids: Iterable[int]) -> None:
        """Forgets everything; `block_ids` are all unreferenced and free (handed out in this order)."""

    def __len__(self) -> int:
        """Unreferenced blocks, free and cached: what `pop` can hand out."""

    def release(self, block_id: int, cached: bool) -> None:
        """The block's last user went away; `cached`: it still holds a published prefix."""

    def reclaim(self, block_id: int) -> None:
        """An unreferenced block got a user again (a prefix hit), so it must not be handed out."""

    def record_hit(self, block_id: int) -> None:
        """A request references the cached block through a prefix-cache match."""

    def pop(self) -> int:
        """Takes the next block to hand out; its history is forgotten. The pool checks `len` first."""

    def block_ids(self) -> list[int]:
        """Unreferenced blocks in the order `pop` would take them. O(n log n); for stats and tests."""


def check_eviction(name: str, field: str = "eviction") -> str:
    """`name` if it names a policy; otherwise an InvalidArgument naming `field`."""
    if name not in EVICTION_POLICIES:
        raise InvalidArgument(f"must be one of {', '.join(EVICTION_POLICIES)}, got {name!r}", field=field)
    return name


def new_policy(name: str, num_blocks: int) -> EvictionPolicy:
    """The policy `name` for a pool of `num_blocks` blocks (ids 0..num_blocks-1)."""
    if check_eviction(name) == "lfu":
        return LfuPolicy(num_blocks)
    return LruPolicy()


class LruPolicy:
    """One ordered dict: head = next out. Cached blocks join the tail, free ones the head."""

    def __init__(self) -> None:
        # OrderedDict rather than a deque: a cache hit must pull a block out of the middle in O(1).
        self._order: OrderedDict[int, None] = OrderedDict()

    def reset(self, block_ids: Iterable[int]) -> None:
        self._order = OrderedDict.fromkeys(block_ids)

    def __len__(self) -> int:
        return len(self._order)

    def release(self, block_id: int, cached: bool) -> None:
        self._order[block_id] = None
        if not cached:
            self._order.move_to_end(block_id, last=False)

    def reclaim(self, block_id: int) -> None:
        del self._order[block_id]

    def record_hit(self, block_id: int) -> None:
        pass  # recency alone decides; the reclaim and the later release already say it was used

    def pop(self) -> int:
        block_id, _ = self._order.popitem(last=False)
        return block_id

    def block_ids(self) -> list[int]:
        return list(self._order)


def _log2_add(log_a: float, log_b: float) -> float:
    """log2(2^log_a + 2^log_b) without overflow (the exponents grow with the clock)."""
    high, low = (log_a, log_b) if log_a >= log_b else (log_b, log_a)
    if low == -math.inf:
        return high
    return high + math.log2(1.0 + 2.0 ** (low - high))


# Stale heap entries are dropped in one sweep once there are more of them than live ones and than
# this floor, so lazy deletion keeps the heap within a constant factor of the cached blocks at an
# amortised O(1) per reclaim, and small pools do not sweep on every other hit.
_MIN_STALE_TO_COMPACT = 64


class LfuPolicy:
    """Free blocks in an ordered dict (head = next out), cached ones in a min-heap of
    (priority, release sequence, block id) with lazy deletion."""

    def __init__(self, num_blocks: int, half_life_ticks: float | None = None) -> None:
        if num_blocks < 1:
            raise InvalidArgument(f"must be >= 1, got {num_blocks}", field="num_blocks")
        self.half_life_ticks = float(half_life_ticks if half_life_ticks is not None else num_blocks)
        if self.half_life_ticks <= 0:
            raise InvalidArgument(f"must be > 0, got {half_life_ticks}", field="half_life_ticks")
        self._num_blocks = num_blocks
        self.reset(())

    def reset(self, block_ids: Iterable[int]) -> None:
        self._tick = 0
        # Per block, log2(sum of 2^(tick / half-life) over its hits since it was last handed out).
        self._log_hits: list[float] = [-math.inf] * self._num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(block_ids)
        self._heap: list[tuple[float, int, int]] = []
        # Cached unreferenced block -> the release sequence of its one live heap entry; any other
        # entry for the block is stale. The sequence also breaks priority ties oldest release first.
        self._live: dict[int, int] = {}
        self._next_seq = 0

    def __len__(self) -> int:
        return len(self._free) + len(self._live)

    def release(self, block_id: int, cached: bool) -> None:
        if not cached:
            self._free[block_id] = None
            self._free.move_to_end(block_id, last=False)
            return
        # The release itself counts like a hit, so blocks nobody hit still age in LRU order.
        priority = _log2_add(self._tick / self.half_life_ticks, self._log_hits[block_id])
        seq = self._next_seq
        self._next_seq += 1
        self._live[block_id] = seq
        heapq.heappush(self._heap, (priority, seq, block_id))

    def reclaim(self, block_id: int) -> None:
        if block_id in self._free:
            del self._free[block_id]
            return
        del self._live[block_id]  # KeyError: the block was not unreferenced, a bug in the caller
        if len(self._heap) - len(self._live) > max(_MIN_STALE_TO_COMPACT, len(self._live)):
            self._heap = [entry for entry in self._heap if self._live.get(entry[2]) == entry[1]]
            heapq.heapify(self._heap)

    def record_hit(self, block_id: int) -> None:
        self._log_hits[block_id] = _log2_add(self._log_hits[block_id], self._tick / self.half_life_ticks)

    def pop(self) -> int:
        if self._free:
            block_id, _ = self._free.popitem(last=False)
        else:
            while True:
                _, seq, block_id = heapq.heappop(self._heap)  # IndexError: the pool did not check len
                if self._live.get(block_id) == seq:
                    del self._live[block_id]
                    break
        self._log_hits[block_id] = -math.inf  # new contents, new count
        self._tick += 1
        return block_id

    def block_ids(self) -> list[int]:
        cached = sorted(entry for entry in self._heap if self._live.get(entry[2]) == entry[1])
        return list(self._free) + [block_id for _, _, block_id in cached]
