"""The autoscaling signal: how many workers a pool should have, from its queue and its KV use.

The scheduler is the one process that sees every pool's queue and every worker's KV blocks, so it
computes the answer itself and exports it (`switchyard_pool_desired_workers{pool}`) next to the
inputs (up workers, waiting and running requests, KV use), for KEDA, an HPA or any other
autoscaler. The rule, for a pool with `n` workers up (retiring ones excluded: they are leaving):

    queue_workers = waiting requests / target_waiting_per_worker
    kv_workers    = KV blocks used / (target_kv_used_ratio * KV blocks per worker)
                  = n * kv_used_ratio / target_kv_used_ratio
    needed        = max(queue_workers, kv_workers)          (fractional workers)

    needed > n                                   -> ceil(needed)  (up, as many as needed at once)
    needed <= (n - 1) * (1 - scale_down_margin)  -> n - 1         (down, one worker per evaluation)
    otherwise                                    -> n             (hold)

and never fewer than `min_workers`. Why these two signals:
- Waiting requests are work that found no room: with continuous batching a request waits at most
  one step while its worker has KV blocks and a sequence slot for it, so a few per worker are
  arrivals between steps, and more mean the pool is full (KV or --max-num-seqs). This is the
  signal that sees demand beyond capacity; it is the HPA's "average value" rule on the queue.
- KV use is the load the running requests put on a worker (their blocks grow with every token),
  and the resource whose exhaustion preempts them. Keeping it under a target leaves the headroom
  that running requests grow into while new workers load their weights (minutes on a GPU).
Running requests are exported too but are not in the rule: they hold KV blocks, so KV use already
counts them, and a pool at its sequence cap shows up as a queue.

Scale-down is deliberately slow: one worker per evaluation, and only when the load would fit on
one worker fewer below `1 - scale_down_margin` of both targets. The band is the hysteresis: after a
worker leaves (its queued requests move to the others, its running ones finish where they are),
the rest sit at most at that fraction of the targets, so the leaving worker is not asked back at
once; and the answer is relative to the workers up now, so evaluating it again before the worker
has gone asks for the same number, not one fewer again. A pool with no worker up has no KV to
read and nothing queued (requests are refused), so it asks for `min_workers`; that is why the
minimum is at least 1: a pool at 0 would never see the queue that should wake it.

Pure: synchronous, no I/O, no clock, nothing of gRPC or Prometheus; metrics.py feeds it at scrape time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from shared.errors import InvalidArgument


@dataclass(frozen=True)
class AutoscalePolicy:
    target_waiting_per_worker: float = 4.0  # waiting requests per worker above which the pool grows
    target_kv_used_ratio: float = 0.75  # KV blocks used / usable, per worker, above which it grows
    scale_down_margin: float = 0.2  # shrink only when one worker fewer stays below (1 - this) * targets
    min_workers: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target_waiting_per_worker) and self.target_waiting_per_worker > 0):
            raise InvalidArgument(f"must be a finite number > 0, got {self.target_waiting_per_worker!r}",
                                  field="autoscale.target_waiting_per_worker")
        if not (math.isfinite(self.target_kv_used_ratio) and 0 < self.target_kv_used_ratio <= 1):
            raise InvalidArgument(f"must be in (0, 1], got {self.target_kv_used_ratio!r}",
                                  field="autoscale.target_kv_used_ratio")
        if not (math.isfinite(self.scale_down_margin) and 0 <= self.scale_down_margin < 1):
            raise InvalidArgument(f"must be in [0, 1), got {self.scale_down_margin!r}",
                                  field="autoscale.scale_down_margin")
        if isinstance(self.min_workers, bool) or not isinstance(self.min_workers, int) or self.min_workers < 1:
            raise InvalidArgument(f"must be an integer >= 1 (a pool at 0 workers queues nothing that could "
                                  f"ask for one), got {self.min_workers!r}", field="autoscale.min_workers")


@dataclass(frozen=True)
class WorkerSample:
    """One worker that is up and not retiring, as the scheduler's mirror of it sees it now."""
    num_waiting: int
    num_running: int
    kv_blocks_used: int  # referenced by a live request (cached blocks with no user count as free)
    kv_blocks_total: int  # usable blocks of its device pool


@dataclass(frozen=True)
class PoolLoad:
    """A pool's inputs to the rule, summed over its workers that are up and not retiring."""
    num_workers_up: int = 0
    num_waiting: int = 0
    num_running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0

    @classmethod
    def of(cls, workers: Iterable[WorkerSample]) -> PoolLoad:
        samples = list(workers)
        return cls(
            num_workers_up=len(samples),
            num_waiting=sum(w.num_waiting for w in samples),
            num_running=sum(w.num_running for w in samples),
            kv_blocks_used=sum(w.kv_blocks_used for w in samples),
            kv_blocks_total=sum(w.kv_blocks_total for w in samples),
        )

    @property
    def kv_used_ratio(self) -> float:
        """Blocks used over blocks usable across the pool (0 with no worker up)."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


_EPSILON = 1e-9


def needed_workers(load: PoolLoad, policy: AutoscalePolicy) -> float:
    """Fractional workers that would hold the pool's load exactly at the targets."""
    queue_workers = load.num_waiting / policy.target_waiting_per_worker
    kv_workers = load.num_workers_up * load.kv_used_ratio / policy.target_kv_used_ratio
    return max(queue_workers, kv_workers)


def desired_workers(load: PoolLoad, policy: AutoscalePolicy) -> int:
    """How many workers the pool should have (the module docstring has the rule and why)."""
    n = load.num_workers_up
    # Float noise must not turn "exactly at the target" into one more worker (3 * 0.7 / 0.7 > 3).
    needed = needed_workers(load, policy) - _EPSILON
    if needed > n:
        desired = math.ceil(needed)
    elif n >= 1 and needed <= (n - 1) * (1 - policy.scale_down_margin):
        desired = n - 1
    else:
        desired = n
    return max(desired, policy.min_workers)
