"""Prefix index: which block already holds the KV of a given full block of prompt tokens.

Keys form a hash chain, `block_hash = H(parent_hash, block_token_ids, cache_salt, model_version)`,
because a block's KV depends on every token before it, not only its own: equal keys mean equal
whole prefixes. The salt and the model version enter every link, so tenants with different salts
never share KV and pools running different weights never do either.

`H` is blake2b over a canonical byte encoding, not Python's `hash`, which is salted per process and
would make keys differ between runs. A 128-bit digest makes collisions astronomically unlikely, but a
collision would silently serve another prompt's KV, so every hit is checked against the stored
tokens (and salt) before it counts; that costs `block_size` integer comparisons.

Only full blocks are indexed: a partial block's contents still change as tokens arrive. Lookups
walk the chain from the root and stop at the first miss, so a lookup costs O(matched blocks + 1)
hashes, never a re-hash of the whole prompt per block.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from shared.errors import InvalidArgument

_DIGEST_BYTES = 16
# Parent of a prompt's first block; every real digest is as long, so the encoding stays unambiguous.
ROOT_HASH = bytes(_DIGEST_BYTES)


def _encode_str(value: str) -> bytes:
    # Length-prefixed so ("ab", "c") and ("a", "bc") never encode alike.
    raw = value.encode("utf-8")
    return len(raw).to_bytes(4, "little") + raw


def hash_block(parent_hash: bytes, token_ids: Sequence[int], cache_salt: str, model_version: str) -> bytes:
    """The stable key of one full block given its parent's key. Module-level so tests can force collisions."""
    digest = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    digest.update(parent_hash)
    digest.update(_encode_str(cache_salt))
    digest.update(_encode_str(model_version))
    # Fixed-width little-endian ids, last, so the token count is implied and no platform changes the bytes.
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return digest.digest()


@dataclass(frozen=True, slots=True)
class _Entry:
    block_id: int
    token_ids: tuple[int, ...]
    cache_salt: str


class PrefixIndex:
    """Full-block hash chain -> block id, for one model version."""

    def __init__(self, block_size: int, model_version: str) -> None:
        if block_size < 1:
            raise InvalidArgument(f"must be >= 1, got {block_size}", field="block_size")
        self.block_size = block_size
        self.model_version = model_version
        self._entries: dict[bytes, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def hash_of(self, parent_hash: bytes, token_ids: Sequence[int], cache_salt: str) -> bytes:
        return hash_block(parent_hash, token_ids, cache_salt, self.model_version)

    def get(self, block_hash: bytes, token_ids: Sequence[int], cache_salt: str) -> int | None:
        """The block indexed under `block_hash` if it really holds `token_ids` for `cache_salt`."""
        entry = self._entries.get(block_hash)
        if entry is None or entry.cache_salt != cache_salt or entry.token_ids != tuple(token_ids):
            return None
        return entry.block_id

    def match(self, token_ids: Sequence[int], cache_salt: str, keys: Sequence[bytes] | None = None,
              start_block: int = 0) -> list[int]:
        """Block ids of the longest indexed run of full blocks of `token_ids` from `start_block` on
        (token-compared); from 0, the longest indexed prefix.

        `keys`, if given, is `chain(token_ids, cache_salt)` computed earlier, so nothing is hashed
        twice; without them only the blocks up to the first miss are hashed.
        """
        block_ids: list[int] = []
        size = self.block_size
        chain = keys if keys is not None else self._keys(token_ids, cache_salt)
        for i, key in itertools.islice(enumerate(chain), start_block, None):
            block_id = self.get(key, token_ids[i * size:(i + 1) * size], cache_salt)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def chain(self, token_ids: Sequence[int], cache_salt: str) -> list[bytes]:
        """The keys of every full block of `token_ids`, in order (indexed or not)."""
        return list(self._keys(token_ids, cache_salt))

    def _keys(self, token_ids: Sequence[int], cache_salt: str) -> Iterator[bytes]:
        parent_hash = ROOT_HASH
        size = self.block_size
        for start in range(0, len(token_ids) - size + 1, size):
            parent_hash = self.hash_of(parent_hash, token_ids[start:start + size], cache_salt)
            yield parent_hash

    def insert(self, block_hash: bytes, block_id: int, token_ids: Sequence[int], cache_salt: str) -> bool:
        """Indexes `block_id` under `block_hash`; False (and no change) if the key is already taken.

        The first mapping wins: its block may already be shared by other requests, and replacing it
        would strand them on a block nobody can find any more.
        """
        if len(token_ids) != self.block_size:
            raise InvalidArgument(f"{len(token_ids)} tokens, only full blocks of {self.block_size} are indexed",
                                  field="token_ids")
        if block_hash in self._entries:
            return False
        self._entries[block_hash] = _Entry(block_id, tuple(token_ids), cache_salt)
        return True

    def remove(self, block_hash: bytes, block_id: int) -> None:
        """Drops the entry if it still names `block_id` (an evicted block must not unmap another)."""
        self.pop(block_hash, block_id)

    def pop(self, block_hash: bytes, block_id: int) -> tuple[tuple[int, ...], str] | None:
        """`remove`, returning the entry's (token_ids, cache_salt) if it named `block_id`: what a
        lower cache tier needs to index the same block under the same key."""
        entry = self._entries.get(block_hash)
        if entry is None or entry.block_id != block_id:
            return None
        del self._entries[block_hash]
        return entry.token_ids, entry.cache_salt

    def entry(self, block_hash: bytes) -> tuple[int, tuple[int, ...], str] | None:
        """(block_id, token_ids, cache_salt) indexed under `block_hash`, if any."""
        entry = self._entries.get(block_hash)
        return None if entry is None else (entry.block_id, entry.token_ids, entry.cache_salt)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._entries

    def clear(self) -> None:
        self._entries.clear()
