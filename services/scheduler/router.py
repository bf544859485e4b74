"""Picks a pool for each request (weighted canary split, sticky sessions), then a worker inside it.

Two steps, because they answer different questions. `choose_pool` is a traffic-management decision:
operators give each pool (one model version) a weight, e.g. stable 90 / canary 10, and roll out or
roll back by changing weights at runtime with `set_weight`. A non-empty session id sticks to the pool
it first landed in, so one conversation never flips between model versions mid-way; it is re-routed
(and re-stuck) only when its pool becomes unavailable or its weight drops to 0 (rollback).

`choose_worker` is a cost decision inside one pool. Every up worker gets

    cost = uncached_prompt_tokens
           + host_hit_cost * host_overlap_tokens
           + load_weight * (num_queued_prefill_tokens + num_running_decode_requests * decode_cost_tokens)

    uncached_prompt_tokens = num_prompt_tokens - overlap_tokens - host_overlap_tokens

and the lowest cost wins; ties go to the worker with the fewest queued prefill tokens, then to the
smallest address, so a decision never depends on the order the loads were listed in. Both halves are
in token-equivalents, i.e. prefill work the worker still has to do: a cached prefix saves exactly its
tokens, a queued prompt delays us by exactly its tokens, and a running decode costs one token per
step for as long as we share the batch with it, which `decode_cost_tokens` approximates. The overlap
is exact, not estimated: it comes from the scheduler's own mirror of each worker's prefix index
(`Batcher.overlap`), so no cache events or approximate radix trees are needed. A prefix that
continues in the worker's host tier (`host_overlap_tokens`) is neither free nor full price: its
blocks are copied up, which costs `host_hit_cost` of a prefill per token.

Knobs (all constructor arguments; the router reads no environment):

- `load_weight` (default 1.0): how much a token of queued work counts against a token of cache hit.
  1.0 means both are the same prefill work; larger spreads load at the expense of cache hits, 0
  routes purely on overlap.
- `decode_cost_tokens` (default 8.0): token-equivalents charged per running decode request.
- `host_hit_cost` (default 0.1): a host-tier hit's cost per token, as a fraction of computing it.
  Copying one token's K/V moves a few tens of KiB (SmolLM2: 30 layers x 2 x 3 heads x 64 x 4 bytes
  = 46 KiB, ~2 us at this machine's 28 GB/s) where computing it costs ~0.27 GFLOP (~4 ms at 66
  GFLOP/s), so on a CPU the true ratio is nearer 0.001; 0.1 leaves room for PCIe on a GPU, where
  the gap is narrower, and still ranks host hits far above recompute and below device hits.
- `max_sessions` (default 100_000): sticky sessions remembered, least recently used forgotten first;
  a forgotten session is simply routed afresh. 0 disables stickiness.
- `seed` (default None = OS entropy): seeds the router's own `random.Random`, so tests and replays
  of the pool split are deterministic and nothing else shares (or perturbs) the stream.
- `policy` (default "cache_aware"): "round_robin" ignores overlap and load and cycles through the
  pool's up workers; it exists as the baseline that benchmarks measure cache-aware routing against.

Every worker choice returns a `RoutingDecision` carrying the chosen pool and worker, its overlap and
cost, and every candidate's cost, so traces and metrics can explain why a request went where it did.
The router is synchronous and does no I/O; the service supplies availability and loads.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared.errors import InvalidArgument, Unavailable

DEFAULT_LOAD_WEIGHT = 1.0
DEFAULT_DECODE_COST_TOKENS = 8.0
DEFAULT_HOST_HIT_COST = 0.1
DEFAULT_MAX_SESSIONS = 100_000
DEFAULT_POLICY = "cache_aware"
POLICIES = ("cache_aware", "round_robin")


@dataclass(frozen=True)
class PoolConfig:
    name: str
    version: str
    weight: float
    worker_addresses: tuple[str, ...]
    dns: str = ""  # "host:port" whose address records are the pool's workers (discovery.py)


@dataclass(frozen=True)
class WorkerLoad:
    """The router's view of one candidate, filled by the service from the batcher and block manager."""

    address: str
    up: bool
    overlap_tokens: int
    num_queued_prefill_tokens: int
    num_running_decode_requests: int
    host_overlap_tokens: int = 0  # continuing overlap_tokens in the worker's host tier


@dataclass(frozen=True)
class CandidateCost:
    address: str
    overlap_tokens: int
    uncached_prompt_tokens: int
    load_tokens: float
    cost: float
    host_overlap_tokens: int = 0


@dataclass(frozen=True)
class RoutingDecision:
    pool: str
    worker: str
    overlap_tokens: int
    cost: float
    candidates: tuple[CandidateCost, ...]
    sticky: bool = False  # the session's existing pool was reused
    host_overlap_tokens: int = 0  # of the chosen worker's host tier


def _check_non_negative(value: float, field: str) -> None:
    # NaN compares false with everything, so `value < 0` alone would let it through.
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"must be a finite number >= 0, got {value!r}", field=field)


def _validate_pools(pools: Sequence[PoolConfig]) -> None:
    if not pools:
        raise InvalidArgument("at least one pool is required", field="pools")
    seen_names: set[str] = set()
    owner_by_address: dict[str, str] = {}
    for index, pool in enumerate(pools):
        if not pool.name:
            raise InvalidArgument("must not be empty", field=f"pools[{index}].name")
        if pool.name in seen_names:
            raise InvalidArgument(f"duplicate pool name {pool.name!r}", field=f"pools[{pool.name}].name")
        seen_names.add(pool.name)
        if not pool.version:
            raise InvalidArgument("must not be empty", field=f"pools[{pool.name}].version")
        _check_non_negative(pool.weight, f"pools[{pool.name}].weight")
        for address in pool.worker_addresses:
            # A worker holds one model, so it cannot serve two versions; a shared address would
            # also make its KV mirror ambiguous.
            if address in owner_by_address:
                raise InvalidArgument(
                    f"worker {address!r} is already in pool {owner_by_address[address]!r}",
                    field=f"pools[{pool.name}].worker_addresses",
                )
            owner_by_address[address] = pool.name


class Router:
    def __init__(
        self,
        pools: Sequence[PoolConfig],
        *,
        load_weight: float = DEFAULT_LOAD_WEIGHT,
        decode_cost_tokens: float = DEFAULT_DECODE_COST_TOKENS,
        host_hit_cost: float = DEFAULT_HOST_HIT_COST,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        seed: int | None = None,
        policy: str = DEFAULT_POLICY,
    ) -> None:
        _validate_pools(pools)
        if policy not in POLICIES:
            raise InvalidArgument(f"must be one of {', '.join(POLICIES)}, got {policy!r}", field="routing")
        _check_non_negative(load_weight, "load_weight")
        _check_non_negative(decode_cost_tokens, "decode_cost_tokens")
        _check_non_negative(host_hit_cost, "host_hit_cost")
        if max_sessions < 0:
            raise InvalidArgument(f"must be >= 0, got {max_sessions}", field="max_sessions")
        # Dict order is the configured order, which keeps weighted draws reproducible for a seed.
        self._pools: dict[str, PoolConfig] = {pool.name: pool for pool in pools}
        self._load_weight = float(load_weight)
        self._decode_cost_tokens = float(decode_cost_tokens)
        self._host_hit_cost = float(host_hit_cost)
        self._max_sessions = max_sessions
        self._sessions: OrderedDict[str, str] = OrderedDict()  # session id -> pool, oldest first
        self._rng = random.Random(seed)
        self._policy = policy
        self._next_index: dict[str, int] = {}  # round robin: next candidate per pool

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    def pools(self) -> list[PoolConfig]:
        return list(self._pools.values())

    def weights(self) -> dict[str, float]:
        return {name: pool.weight for name, pool in self._pools.items()}

    def routable(self) -> tuple[tuple[str, str], ...]:
        """(name, version) of every pool new requests may go to (weight > 0), in configured order."""
        return tuple((pool.name, pool.version) for pool in self._pools.values() if pool.weight > 0)

    def version_of(self, pool: str) -> str:
        return self._pools[pool].version

    def set_weight(self, pool: str, weight: float) -> None:
        current = self._pools.get(pool)
        if current is None:
            raise InvalidArgument(f"unknown pool {pool!r}; known: {sorted(self._pools)}", field="pool")
        _check_non_negative(weight, "weight")
        self._pools[pool] = dataclasses.replace(current, weight=float(weight))
        # Sessions stuck to a pool now at weight 0 are not purged here: choose_pool re-routes them
        # lazily, which also covers a weight that comes back before they return.

    def choose_pool(self, session_id: str, available: Callable[[str], bool]) -> tuple[str, bool]:
        if session_id:
            stuck = self._sessions.get(session_id)
            if stuck is not None:
                if self._pools[stuck].weight > 0 and available(stuck):
                    self._sessions.move_to_end(session_id)
                    return stuck, True
                del self._sessions[session_id]

        eligible = [pool for pool in self._pools.values() if pool.weight > 0 and available(pool.name)]
        if not eligible:
            raise Unavailable("no pool with weight > 0 has a worker up")
        chosen = self._rng.choices(eligible, weights=[pool.weight for pool in eligible])[0].name

        if session_id and self._max_sessions > 0:
            self._sessions[session_id] = chosen
            if len(self._sessions) > self._max_sessions:
                self._sessions.popitem(last=False)
        return chosen, False

    def choose_worker(
        self, pool: str, num_prompt_tokens: int, loads: Sequence[WorkerLoad], *, sticky: bool = False
    ) -> RoutingDecision:
        """Lowest-cost up worker of `pool`; `sticky` (from choose_pool) is only copied into the record."""
        if pool not in self._pools:
            raise InvalidArgument(f"unknown pool {pool!r}; known: {sorted(self._pools)}", field="pool")
        if num_prompt_tokens < 0:
            raise InvalidArgument(f"must be >= 0, got {num_prompt_tokens}", field="num_prompt_tokens")

        candidates: list[CandidateCost] = []
        queued_by_address: dict[str, int] = {}
        for load in loads:
            if not load.up:
                continue
            # An overlap can never exceed the prompt it was looked up on; clamping keeps a stale
            # load from producing a negative uncached count that would reward it.
            overlap_tokens = min(max(load.overlap_tokens, 0), num_prompt_tokens)
            host_overlap_tokens = min(max(load.host_overlap_tokens, 0), num_prompt_tokens - overlap_tokens)
            uncached_prompt_tokens = num_prompt_tokens - overlap_tokens - host_overlap_tokens
            load_tokens = (
                load.num_queued_prefill_tokens + load.num_running_decode_requests * self._decode_cost_tokens
            )
            cost = (uncached_prompt_tokens + self._host_hit_cost * host_overlap_tokens
                    + self._load_weight * load_tokens)
            candidates.append(CandidateCost(load.address, overlap_tokens, uncached_prompt_tokens, float(load_tokens),
                                            cost, host_overlap_tokens))
            queued_by_address[load.address] = load.num_queued_prefill_tokens
        if not candidates:
            raise Unavailable(f"no worker of pool {pool!r} is up")

        if self._policy == "round_robin":
            # The baseline cache-aware routing is measured against: ignores overlap and load.
            index = self._next_index.get(pool, 0)
            best = sorted(candidates, key=lambda c: c.address)[index % len(candidates)]
            self._next_index[pool] = index + 1
        else:
            best = min(candidates, key=lambda c: (c.cost, queued_by_address[c.address], c.address))
        return RoutingDecision(
            pool=pool,
            worker=best.address,
            overlap_tokens=best.overlap_tokens,
            cost=best.cost,
            candidates=tuple(candidates),
            sticky=sticky,
            host_overlap_tokens=best.host_overlap_tokens,
        )
