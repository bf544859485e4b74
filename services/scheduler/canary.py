"""Automatic canary rollback: compares each pool's recent requests with the baseline pool's.

Every finished request is recorded against the pool that served it: whether it failed and, if a
token came, its time to first token. Over a sliding window (`window_s`), a pool other than the
baseline is rolled back (its weight goes to 0) when it has enough requests to judge and

    error_rate(pool) - error_rate(baseline) > max_error_rate_increase, or
    p99_ttft(pool) > max_ttft_p99_ratio * p99_ttft(baseline)

(the TTFT test needs `min_requests` requests with a first token in both pools). The baseline is
the yardstick, not an oracle: if it is failing too, a canary that fails the same way is not worse
and stays. A failure here means what it means to the client and the operator: the request ended
with an error the client did not cause. Cancels and deadlines are the client's choice: such a
request counts as served, not failed (`RequestError.by_client`).

The guard only ever takes a weight down, never up: it reports one
`Rollback` per pool, once, and forgets the pool's window so that an operator who restores the
weight (`rearm`) starts from a clean slate. The guard is synchronous and does no I/O; the fleet
feeds it and applies its decisions to the router.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from shared.errors import InvalidArgument

@dataclass(frozen=True)
class RollbackPolicy:
    enabled: bool = True
    window_s: float = 60.0
    min_requests: int = 20  # per pool in the window before it is judged
    max_error_rate_increase: float = 0.05  # absolute: 0.05 = five more failures per hundred requests
    max_ttft_p99_ratio: float = 2.0  # canary p99 TTFT over the baseline's
    baseline_pool: str = ""  # "" = the pool with the highest weight when the guard is built

    def __post_init__(self) -> None:
        for name in ("window_s", "max_error_rate_increase", "max_ttft_p99_ratio"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise InvalidArgument(f"must be a finite number > 0, got {value!r}", field=f"rollback.{name}")
        if self.min_requests < 1:
            raise InvalidArgument(f"must be >= 1, got {self.min_requests}", field="rollback.min_requests")


@dataclass(frozen=True)
class WindowStats:
    num_requests: int
    num_errors: int
    num_first_tokens: int  # requests that got a first token (the TTFT sample)
    ttft_p99_s: float | None  # None: no request with a first token

    @property
    def error_rate(self) -> float:
        return self.num_errors / self.num_requests if self.num_requests else 0.0


@dataclass(frozen=True)
class Rollback:
    pool: str
    baseline_pool: str
    reason: str  # "error_rate" or "ttft_p99"
    pool_stats: WindowStats
    baseline_stats: WindowStats

    def describe(self) -> str:
        ours, base = self.pool_stats, self.baseline_stats
        if self.reason == "error_rate":
            detail = f"error rate {ours.error_rate:.3f} vs {base.error_rate:.3f}"
        else:
            detail = f"p99 TTFT {ours.ttft_p99_s:.3f} s vs {base.ttft_p99_s:.3f} s"
        return (f"pool {self.pool!r} rolled back: {detail} in pool {self.baseline_pool!r} "
                f"({ours.num_requests} vs {base.num_requests} requests in the window)")


@dataclass(frozen=True)
class PoolView:
    """One pool for operators (the admin RPC): configuration, members and rollback state."""

    name: str
    version: str
    weight: float
    dns: str
    worker_addresses: tuple[str, ...]
    num_workers_up: int
    rolled_back: bool
    rollback_reason: str
    window: WindowStats


@dataclass(frozen=True)
class _Outcome:
    at_s: float
    failed: bool
    ttft_s: float | None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in (0, 100]) of a non-empty list: an observed value, no interpolation."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


class RollbackGuard:
    def __init__(self, policy: RollbackPolicy, pool_weights: dict[str, float]) -> None:
        if not pool_weights:
            raise InvalidArgument("at least one pool is required", field="pools")
        baseline = policy.baseline_pool or max(pool_weights, key=lambda name: pool_weights[name])
        if baseline not in pool_weights:
            raise InvalidArgument(f"unknown pool {baseline!r}; known: {sorted(pool_weights)}",
                                  field="rollback.baseline_pool")
        self.policy = policy
        self.baseline_pool = baseline
        self._windows: dict[str, deque[_Outcome]] = {name: deque() for name in pool_weights}
        self.rolled_back: dict[str, Rollback] = {}

    def record(self, pool: str, now_s: float, *, failed: bool, ttft_s: float | None) -> None:
        window = self._windows.setdefault(pool, deque())
        window.append(_Outcome(now_s, failed, ttft_s))
        self._trim(window, now_s)

    def stats(self, pool: str, now_s: float) -> WindowStats:
        window = self._windows.get(pool, deque())
        self._trim(window, now_s)
        ttfts = [o.ttft_s for o in window if o.ttft_s is not None]
        return WindowStats(
            num_requests=len(window), num_errors=sum(o.failed for o in window), num_first_tokens=len(ttfts),
            ttft_p99_s=percentile(ttfts, 99.0) if ttfts else None,
        )

    def evaluate(self, now_s: float, weights: dict[str, float]) -> list[Rollback]:
        """Pools (weight > 0, not the baseline) that are worse than the baseline right now."""
        if not self.policy.enabled:
            return []
        base = self.stats(self.baseline_pool, now_s)
        if base.num_requests < self.policy.min_requests:
            return []  # nothing to compare with
        decisions = []
        for pool, weight in weights.items():
            if pool == self.baseline_pool or weight <= 0 or pool in self.rolled_back:
                continue
            ours = self.stats(pool, now_s)
            if ours.num_requests < self.policy.min_requests:
                continue
            reason = self._reason(ours, base)
            if reason:
                decision = Rollback(pool, self.baseline_pool, reason, ours, base)
                self.rolled_back[pool] = decision
                self._windows[pool].clear()
                decisions.append(decision)
        return decisions

    def rearm(self, pool: str) -> None:
        """An operator set the pool's weight again: judge it afresh from now on."""
        self.rolled_back.pop(pool, None)
        self._windows.setdefault(pool, deque()).clear()

    def _reason(self, ours: WindowStats, base: WindowStats) -> str:
        if ours.error_rate - base.error_rate > self.policy.max_error_rate_increase:
            return "error_rate"
        enough = min(ours.num_first_tokens, base.num_first_tokens) >= self.policy.min_requests
        if enough and ours.ttft_p99_s > self.policy.max_ttft_p99_ratio * base.ttft_p99_s:
            return "ttft_p99"
        return ""

    def _trim(self, window: deque[_Outcome], now_s: float) -> None:
        horizon = now_s - self.policy.window_s
        while window and window[0].at_s < horizon:
            window.popleft()
