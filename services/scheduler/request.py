"""A generation request as the scheduler tracks it, from admission to its finish.

The scheduler keeps the only authoritative copy of a request's tokens: the worker holds a mirror
that may be dropped at any time (preemption, a dead worker), so everything needed to send the
request again in full — prompt, tokens generated so far, resolved sampling — lives here. Sampling
arrives already resolved to concrete values (`SamplingParams`) so no default is applied twice.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from shared.sampling_rules import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and queued again; owns no blocks
    RUNNING = "running"  # owns blocks and the worker holds its state
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop token id
    LENGTH = "length"  # max_tokens or the model's max length
    ABORT = "abort"  # cancelled, deadline passed, or the worker reported an error


class ErrorKind(enum.Enum):
    """Why a request ended early. The first two are the client's own limits, not failures."""

    CANCELLED = "cancelled"  # the client, or its front door (a stop string), stopped it
    DEADLINE = "deadline"  # its deadline passed
    UNAVAILABLE = "unavailable"  # no worker of its pool could take it
    FAILED = "failed"  # the worker could not compute or sample it
    REFUSED = "refused"  # admission turned it away (never ran)


@dataclass(frozen=True)
class RequestError:
    """A request's end by an error: what kind (for status codes, metrics, rollback), and why."""

    kind: ErrorKind
    message: str

    @property
    def by_client(self) -> bool:
        """The client's own end (cancel, deadline): served, not failed."""
        return self.kind in (ErrorKind.CANCELLED, ErrorKind.DEADLINE)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class TokenLogprob:
    logprob: float
    top_token_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    priority: int = 0  # higher first
    arrival_s: float = 0.0  # same clock as deadline_s; the batch wait (batch_wait.py) counts from it
    deadline_s: float | None = None  # absolute, same clock as the `now_s` given to Batcher.expire
    session_id: str = ""
    cache_salt: str = ""
    trace_context: str = ""  # W3C traceparent of the request's scheduler span; workers link step spans to it
    # Constrained decoding (the worker masks the logits; opaque here). Such a request gets no
    # speculative drafts: the worker's grammar state advances one sampled token at a time.
    grammar: str = ""
    # Mutable state, owned by the Batcher that holds the request.
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V the worker has (or is writing in the steps in flight)
    # Tokens the worker will have sampled in steps planned but not yet answered (async scheduling):
    # a decode planned ahead inputs a token only the worker knows yet.
    num_output_placeholders: int = 0
    # Draft tokens in the step in flight (speculative decoding): planned as computed, and rolled
    # back to the accepted ones when the reply comes.
    num_draft_tokens: int = 0
    # Speculation's backoff (speculation.py): steps in a row whose drafts were all rejected, and
    # how many more plans it gets no proposals.
    num_draft_misses: int = 0
    draft_backoff_plans: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at the FIRST placement (usage)
    num_host_cached_tokens: int = 0  # of those, the ones copied up from the host tier (L2)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    num_expected_cached_tokens: int = 0  # the router's overlap when it placed the request (load estimate)
    # Its own timeline, on the fleet's clock (time.monotonic); metrics and spans only read these.
    first_scheduled_s: float | None = None  # set by the worker loop when a step first includes it
    first_token_s: float | None = None  # set by the fleet when its first token is delivered
    last_token_s: float | None = None  # set by the fleet at each delivery with tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

