"""Prefixes routed to a worker but not yet computed there.

The prefix index only knows blocks a step has finished. When many requests sharing a new prefix
arrive together, the first is routed before anything is cached, and without this record the rest
would see no overlap anywhere and spread over the pool, each computing the prefix again. Recording
each routed prompt's block-hash chain until its first token arrives (by then its blocks are in the
real index) lets the router send them after the first.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from services.scheduler.prefix_index import ROOT_HASH, hash_block


class PendingPrefixes:
    def __init__(self, block_size: int, model_version: str) -> None:
        self.block_size = block_size
        self.model_version = model_version
        self._counts: Counter[bytes] = Counter()
        self._by_request: dict[str, list[bytes]] = {}

    def _chain(self, token_ids: Sequence[int], cache_salt: str) -> list[bytes]:
        hashes, parent, size = [], ROOT_HASH, self.block_size
        for start in range(0, len(token_ids) - size + 1, size):
            parent = hash_block(parent, token_ids[start:start + size], cache_salt, self.model_version)
            hashes.append(parent)
        return hashes

    def add(self, request_id: str, token_ids: Sequence[int], cache_salt: str) -> None:
        if request_id in self._by_request:
            return
        chain = self._chain(token_ids, cache_salt)
        self._by_request[request_id] = chain
        self._counts.update(chain)

    def remove(self, request_id: str) -> None:
        for block_hash in self._by_request.pop(request_id, ()):
            self._counts[block_hash] -= 1
            if self._counts[block_hash] <= 0:
                del self._counts[block_hash]

    def overlap_tokens(self, token_ids: Sequence[int], cache_salt: str) -> int:
        """Tokens of the longest full-block prefix of `token_ids` some pending request shares."""
        if not self._counts:
            return 0
        num_blocks, parent, size = 0, ROOT_HASH, self.block_size
        for start in range(0, len(token_ids) - size + 1, size):
            parent = hash_block(parent, token_ids[start:start + size], cache_salt, self.model_version)
            if parent not in self._counts:
                break
            num_blocks += 1
        return num_blocks * size

    def __len__(self) -> int:
        return len(self._by_request)
