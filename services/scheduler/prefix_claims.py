"""Prefix claims: block keys that live requests have claimed on one worker, until each lets go.

The batcher keeps two sets of them (batcher.py): prompts promised to the worker (routed, first
token not yet out: the router counts them as overlap) and blocks being computed right now (a
prompt that needs one waits for it instead of computing it twice). Both are the same bookkeeping:
a request claims keys, a key is claimed while any request holds it, and a request's claims go
all at once when it is done or leaves.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence


class PrefixClaims:
    """Counted key claims, released per request; pure bookkeeping, no I/O."""

    def __init__(self) -> None:
        self._counts: Counter[bytes] = Counter()
        self._by_request: dict[str, list[bytes]] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._counts

    def __bool__(self) -> bool:
        return bool(self._counts)

    def holds(self, request_id: str) -> bool:
        return request_id in self._by_request

    def claim(self, request_id: str, keys: Iterable[bytes]) -> None:
        keys = list(keys)
        self._by_request[request_id] = keys
        self._counts.update(keys)

    def release(self, request_id: str) -> None:
        for key in self._by_request.pop(request_id, ()):
            self._counts[key] -= 1
            if self._counts[key] <= 0:
                del self._counts[key]

    def prefix_length(self, keys: Sequence[bytes]) -> int:
        """How many leading `keys` are claimed."""
        length = 0
        for key in keys:
            if key not in self._counts:
                break
            length += 1
        return length

    def clear(self) -> None:
        self._counts.clear()
        self._by_request.clear()
