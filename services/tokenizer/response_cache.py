"""The front door's response cache: whole answers to deterministic requests, replayed on a repeat.

Only a deterministic request is cached: greedy (temperature 0) or seeded (the worker's sampler
draws a seeded request's noise from the seed and the token's position alone, never from its batch).
Its key is a digest of everything that decides the answer: the API key's name (so one tenant never
reads another's answer), the cache salt, the prompt token ids and every sampling field as the front
door resolved it (max_tokens after defaults, stop strings, stop ids, logprobs, penalties, ...).

The model is not in the key, because the front door does not choose it: the scheduler picks the
pool. Instead each entry records the pool and model version that produced it (the scheduler names
them on every token event), and the scheduler announces on the Connect stream which pools are
routable (weight > 0), at connect and on every change. An entry is served and stored only while its
pool is routable; when a pool stops being routable (a canary rolled back, an operator's weight 0)
its entries are dropped at once, so a rollback never serves a canary's answer. While the set is
unknown (no stream yet, or it broke) nothing is served or stored, and entries wait for the next
announcement. The pool's name is part of the identity, not only its version label, so a canary that
reuses the stable label (a new worker build of the same weights) is still dropped on its rollback.

Memory is bounded by a byte budget, least recently used first out; an entry's size is the deep
size of its objects as Python holds them (`sys.getsizeof` over the chunks and every string, tuple,
int and float in them) plus its key and bookkeeping, so the budget bounds real memory. Entries
expire `ttl_s` after they were stored. Expired entries are dropped as lookups and stores pass.

Pure and synchronous, no I/O: the clock and the eviction hook are injected.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from services.tokenizer.api_types import GenerateChunk, ServingPool
from shared.errors import InvalidArgument
from shared.sampling_rules import GREEDY_TEMPERATURE, SamplingFields

# Sampling fields that are floats: 0 and 0.0 (a JSON integer) must make the same key.
_FLOAT_FIELDS = frozenset({"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                           "frequency_penalty"})
# Finish reasons of a complete answer; "abort" (and an error, which has none) is never stored.
_COMPLETE = frozenset({"stop", "length"})
# Per entry beyond its chunks, key and pool: the entry object with its expiry float and size int
# (~130 bytes), its OrderedDict slot (~85) and up to two expiry records (~130; see `_expire`).
_BOOKKEEPING_BYTES = 384
_KEY_PERSON = b"switchyard-rc-1"  # bumped when the key's layout changes, so old and new never meet

# How a client sees the cache: this response header / initial metadata key carries GenerateChunk.cache
# ("hit", "miss", "bypass", "uncacheable"); over gRPC, a client asks for a bypass with the metadata key
# below and a `Cache-Control` value ("no-cache", "no-store"), over HTTP with `Cache-Control` itself.
CACHE_STATUS_KEY = "x-switchyard-cache"
CACHE_CONTROL_METADATA_KEY = "x-switchyard-cache-control"

EvictionHook = Callable[[str], None]  # called once per entry dropped: "capacity", "expired" or "version"


def is_deterministic(s: SamplingFields) -> bool:
    """Greedy (the worker's own threshold) or seeded: the same request gives the same answer."""
    return s.seed is not None or (s.temperature is not None and s.temperature < GREEDY_TEMPERATURE)


def cache_key(tenant: str, cache_salt: str, prompt_token_ids: Sequence[int], sampling: SamplingFields,
              grammar: str = "") -> bytes:
    """A 32-byte digest of everything that decides a deterministic answer, except the model (see
    the module docstring). Equal inputs give equal keys; any difference gives another key."""
    fields = {name: (float(value) if name in _FLOAT_FIELDS and value is not None else value)
              for name, value in dataclasses.asdict(sampling).items()}
    blob = json.dumps({"tenant": tenant, "salt": cache_salt, "prompt": list(prompt_token_ids), "sampling": fields,
                       "grammar": grammar},
                      sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.blake2b(blob.encode(), digest_size=32, person=_KEY_PERSON).digest()


@dataclass(frozen=True)
class CacheControl:
    """What a client allows for one call: `no-cache` skips the lookup but stores the fresh answer
    (HTTP's meaning: do not answer from the cache without asking the origin); `no-store` does neither."""

    read: bool = True
    write: bool = True

    @classmethod
    def parse(cls, value: str | None) -> CacheControl:
        """From a `Cache-Control` value; unknown directives are ignored, as HTTP caches do."""
        directives = {part.split("=", 1)[0].strip().lower() for part in (value or "").split(",")}
        no_store = "no-store" in directives
        return cls(read=not (no_store or "no-cache" in directives), write=not no_store)


def deep_size(obj: object) -> int:
    """Bytes held by `obj` and everything it refers to (tuples, lists, dicts, dataclasses), each
    object counted once. Shared immortal objects (small ints, interned strings) are counted too:
    an estimate that errs high, never low."""
    seen: set[int] = set()
    pending = [obj]
    total = 0
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        total += sys.getsizeof(item)
        if isinstance(item, (tuple, list)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            names = _field_names(type(item))
            pending.extend(getattr(item, name) for name in names)
            if hasattr(item, "__dict__"):
                # As a plain dict of its fields: never less than the instance's own, and unlike
                # `vars()` (which would build one) measuring it changes nothing.
                total += sys.getsizeof(dict.fromkeys(names))
    return total


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def entry_bytes(key: bytes, chunks: Sequence[GenerateChunk], served_by: ServingPool) -> int:
    """What one entry costs: its chunks, key and pool as held in memory, plus bookkeeping."""
    return deep_size((key, tuple(chunks), served_by)) + _BOOKKEEPING_BYTES


@dataclass(frozen=True, slots=True)
class _Entry:
    chunks: tuple[GenerateChunk, ...]
    served_by: ServingPool
    expires_s: float
    num_bytes: int


class ResponseCache:
    def __init__(self, max_bytes: int, ttl_s: float, *, clock: Callable[[], float] = time.monotonic,
                 on_evict: EvictionHook | None = None) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise InvalidArgument(f"must be a whole number of bytes > 0, got {max_bytes!r}", field="response_cache_mib")
        if not math.isfinite(ttl_s) or ttl_s <= 0:
            raise InvalidArgument(f"must be a finite number of seconds > 0, got {ttl_s!r}",
                                  field="response_cache_ttl_s")
        self.max_bytes = max_bytes
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._on_evict = on_evict or (lambda reason: None)
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # least recently used first
        # (expiry, key) in the order stored: with one TTL for all, also the order they expire in. A
        # record whose entry was replaced or dropped since is skipped when its time comes.
        self._expiry: deque[tuple[float, bytes]] = deque()
        self._routable: frozenset[ServingPool] | None = None  # None: not announced yet
        self.num_bytes = 0

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    @property
    def routable(self) -> frozenset[ServingPool] | None:
        return self._routable

    def get(self, key: bytes) -> tuple[GenerateChunk, ...] | None:
        """The stored answer's chunks, or None: absent, expired, or its pool not routable now."""
        self._expire(self._clock())
        entry = self._entries.get(key)
        if entry is None or self._routable is None or entry.served_by not in self._routable:
            return None
        self._entries.move_to_end(key)
        return entry.chunks

    def put(self, key: bytes, chunks: Sequence[GenerateChunk], served_by: ServingPool) -> bool:
        """Stores a complete answer that `served_by` produced; whether it was stored. Refused: an
        answer that is not complete, from a pool not routable now, or larger than the whole budget."""
        chunks = tuple(chunks)
        if not chunks or chunks[-1].finish_reason not in _COMPLETE:
            return False
        if self._routable is None or served_by not in self._routable:
            return False  # announced gone while the answer was on its way: never served, never stored
        num_bytes = entry_bytes(key, chunks, served_by)
        if num_bytes > self.max_bytes:
            return False
        now = self._clock()
        self._expire(now)
        replaced = self._entries.pop(key, None)
        if replaced is not None:
            self.num_bytes -= replaced.num_bytes  # the same request again: a refresh, not an eviction
        while self.num_bytes + num_bytes > self.max_bytes:
            self._drop(next(iter(self._entries)), "capacity")
        expires_s = now + self.ttl_s
        self._entries[key] = _Entry(chunks, served_by, expires_s, num_bytes)
        self._expiry.append((expires_s, key))
        self.num_bytes += num_bytes
        return True

    def set_routable(self, pools: Iterable[ServingPool] | None) -> None:
        """The scheduler's announcement: the pools new requests may be routed to. Entries of any other
        pool are dropped. None (the stream to the scheduler broke): serve nothing until told again."""
        if pools is None:
            self._routable = None
            return
        self._routable = frozenset(pools)
        for key in [k for k, e in self._entries.items() if e.served_by not in self._routable]:
            self._drop(key, "version")

    def _expire(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            expires_s, key = self._expiry.popleft()
            entry = self._entries.get(key)
            if entry is not None and entry.expires_s == expires_s:
                self._drop(key, "expired")
        if len(self._expiry) > 2 * len(self._entries) + 16:
            # Records of entries evicted for room or replaced would otherwise wait out their TTL; kept
            # within twice the live ones, the bookkeeping an entry is charged for covers them.
            self._expiry = deque(sorted((e.expires_s, k) for k, e in self._entries.items()))

    def _drop(self, key: bytes, reason: str) -> None:
        entry = self._entries.pop(key)
        self.num_bytes -= entry.num_bytes
        self._on_evict(reason)
