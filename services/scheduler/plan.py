"""The values that cross the Batcher's boundary: a step's plan, the worker's outputs, stream events
(and the Delivery a front door's stream carries).

They live apart from the Batcher so that `wire.py` (the only protobuf code) and the tests can
depend on plain frozen values without the scheduling logic; `batcher.py` re-exports them, which
is where the interface spec names them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.scheduler.request import FinishReason, Request, RequestError, TokenLogprob
from shared.errors import SwitchyardError


@dataclass(frozen=True)
class ScheduledNew:
    """A request sent in full: first placement, or again after preemption or a move from a dead worker.

    `request` is the live object; read the counts from this record, not from the request, which
    already reflects the step as planned.
    """

    request: Request
    block_ids: tuple[int, ...]  # the whole block table, cached prefix blocks first
    num_computed_tokens: int  # tokens whose K/V is already in those blocks (prefix cache hits)
    num_scheduled_tokens: int


@dataclass(frozen=True)
class ScheduledCached:
    """A request the worker already holds: deltas only."""

    request_id: str
    new_block_ids: tuple[int, ...]  # appended to the worker's block table
    num_computed_tokens: int  # before this step; the worker checks it against its own count
    num_scheduled_tokens: int
    # The live object, so a reply is applied to the request that was planned and not to a later
    # one that reused its id while the step was in flight.
    request: Request | None = field(default=None, compare=False, repr=False)
    # Speculative decoding: guessed tokens after the request's last one, counted in
    # num_scheduled_tokens (speculation.py); the reply holds the accepted ones and one more.
    draft_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class StepPlan:
    step_id: int
    new_requests: tuple[ScheduledNew, ...]
    cached_requests: tuple[ScheduledCached, ...]
    finished_request_ids: tuple[str, ...]  # the worker drops these (finished, aborted, preempted) BEFORE running
    num_preemptions: int = 0  # running requests sent back to the queue while this plan was built
    # Host-tier copies the worker makes before this step's forward pass (block_manager.take_copies):
    copies_to_host: tuple[tuple[int, int], ...] = ()  # (device block, host block): evicted, kept
    copies_to_device: tuple[tuple[int, int], ...] = ()  # (host block, device block): host hits

    @property
    def num_scheduled_tokens(self) -> int:
        return (sum(s.num_scheduled_tokens for s in self.new_requests)
                + sum(s.num_scheduled_tokens for s in self.cached_requests))

    @property
    def is_empty(self) -> bool:
        return not (self.new_requests or self.cached_requests or self.finished_request_ids
                    or self.copies_to_host or self.copies_to_device)


@dataclass(frozen=True)
class RequestOutput:
    """What the worker returned for one request in one step."""

    request_id: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token when the request asked for logprobs
    error: str = ""  # set when the worker could not sample this request; the request is aborted


@dataclass(frozen=True)
class RequestEvent:
    """What the request's stream receives after a step (or an abort)."""

    request_id: str
    token_ids: tuple[int, ...]  # new tokens only
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: FinishReason | None  # None while the request goes on
    error: RequestError | None = None  # set on a last event that ends the request with an error

    def then(self, later: RequestEvent) -> RequestEvent:
        """This event followed by `later` as one: a stream that fell behind sends one message, not two."""
        return RequestEvent(self.request_id, self.token_ids + later.token_ids, self.logprobs + later.logprobs,
                            later.finish_reason, later.error)


@dataclass(frozen=True)
class Delivery:
    """One event as it goes down the stream, with the request's counts at the time it was made."""

    event: RequestEvent
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    error: SwitchyardError | None = None  # set on a last event that ends the request with an error
    pool: str = ""  # the pool computing the request; "" for a request never placed
    model_version: str = ""  # that pool's model version label
    resubmit: bool = False  # refused only because this scheduler is stepping down: try another


@dataclass(frozen=True)
class Outgoing:
    """One message down a front door's Connect stream."""

    deliveries: list[Delivery]
    # (pool, version) of every routable pool: on the stream's first message and when the set changed
    # since the last one; None means unchanged.
    routable: tuple[tuple[str, str], ...] | None = None
