"""Per-API-key token buckets: a steady request rate with room for bursts.

Pure and synchronous: the clock is passed in. Each key (by its name, never the secret) has a bucket
of `burst` requests that refills at `rate_per_s`; a request takes one. An empty bucket answers how
long until the next request would fit, which becomes the `retry-after-ms` hint (gRPC) or the
`Retry-After` header (HTTP). Buckets are created on first use and at most one per configured key
exists, so memory is bounded by the key file, not by traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import InvalidArgument


@dataclass(slots=True)
class _Bucket:
    num_tokens: float
    updated_s: float


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: int) -> None:
        if not rate_per_s > 0:
            raise InvalidArgument(f"must be > 0, got {rate_per_s}", field="rate_limit_per_s")
        if burst < 1:
            raise InvalidArgument(f"must be >= 1, got {burst}", field="rate_limit_burst")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key_name: str, now_s: float) -> float:
        """Takes one request from `key_name`'s bucket: 0.0 if allowed, else seconds until one fits."""
        bucket = self._buckets.get(key_name)
        if bucket is None:
            bucket = self._buckets[key_name] = _Bucket(float(self.burst), now_s)
        elapsed_s = max(0.0, now_s - bucket.updated_s)
        bucket.num_tokens = min(float(self.burst), bucket.num_tokens + elapsed_s * self.rate_per_s)
        bucket.updated_s = now_s
        if bucket.num_tokens >= 1.0:
            bucket.num_tokens -= 1.0
            return 0.0
        return (1.0 - bucket.num_tokens) / self.rate_per_s
