"""The batch wait: how long an idle worker's first step may hold for more arrivals to batch with.

Continuous batching sends a step as soon as there is work. On an idle worker that means a lone
request starts a step at once, and a second one arriving a millisecond later waits that whole step
out before it can join. Under bursty (Poisson) arrivals a short wait turns several small first
steps into one larger one: more work per step, paid for with up to `batch_wait_ms` of TTFT on the
requests that waited.

The rule (`batch_wait_ms` > 0; 0, the default, never holds anything):
- Only an idle worker holds: nothing running and no step in flight. A busy worker's next step is
  due anyway (its decodes must not stall), and an arrival joins it as continuous batching always did.
- The wait starts when the oldest waiting request arrived: no request is held past its own
  `arrival_s + batch_wait_ms`, so one that already queued behind a busy worker is not held again
  when the worker turns idle, and neither is one moved here from a dead worker.
- The step goes before that if the queue fills it: `max_num_seqs` requests or
  `max_num_batched_tokens` of prompt work (the batcher says which; `full`).
- The hold never runs past a waiting request's deadline, so the loop wakes in time to expire it
  (and then decides again for the others). An abort needs nothing here: it takes the request out
  of the batcher at once, and the next decision sees the queue without it.

Pure: time is passed in (the same clock as `Request.arrival_s` and `deadline_s`); nothing here
waits. The worker loop does the waiting until `hold_until_s` or the next arrival, whichever first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from services.scheduler.request import Request
from shared.errors import InvalidArgument


@dataclass(frozen=True)
class BatchWait:
    wait_ms: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.wait_ms) and self.wait_ms >= 0):
            raise InvalidArgument(f"must be a finite number of milliseconds >= 0, got {self.wait_ms}",
                                  field="batch_wait_ms")

    def hold_until_s(self, now_s: float, waiting: Sequence[Request], *, full: bool) -> float | None:
        """Until when an idle worker's first step holds (None: plan it now). `waiting` is the queue
        of an idle worker; `full` says whether it already fills a step."""
        if not self.wait_ms or not waiting or full:
            return None
        until_s = min(r.arrival_s for r in waiting) + self.wait_ms / 1000
        for request in waiting:
            if request.deadline_s is not None:
                until_s = min(until_s, request.deadline_s)
        return until_s if now_s < until_s else None
