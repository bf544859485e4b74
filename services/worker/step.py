"""Plain dataclasses of one step, as the worker core sees it (wire.py converts from protobuf)."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.sampling_rules import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """A request the worker has not seen, sent in full once."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    sampling: SamplingParams
    block_ids: tuple[int, ...]
    num_computed_tokens: int
    num_scheduled_tokens: int
    trace_context: str = ""  # W3C traceparent of the request's scheduler span
    grammar: str = ""  # llguidance grammar constraining its tokens (grammar.py); "" is free


@dataclass(frozen=True)
class CachedRequestData:
    """A request the worker holds: only the new blocks and how many tokens to compute."""

    request_id: str
    new_block_ids: tuple[int, ...]
    num_scheduled_tokens: int
    num_computed_tokens: int | None = None  # the scheduler's view, checked when given
    # Speculative decoding: guessed tokens after the request's last one, counted in
    # num_scheduled_tokens; the worker keeps those its sampling agrees with (speculation.py).
    draft_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class StepInput:
    step_id: int = 0
    new_requests: tuple[NewRequestData, ...] = ()
    cached_requests: tuple[CachedRequestData, ...] = ()
    finished_request_ids: tuple[str, ...] = ()
    # (device block, host block): evicted device blocks whose K/V the host tier keeps; done first.
    copies_to_host: tuple[tuple[int, int], ...] = ()
    # (host block, device block): host-tier prefix hits, brought back before the forward pass.
    copies_to_device: tuple[tuple[int, int], ...] = ()
    scheduler_epoch: int = 0  # the sender's; the servicer refuses a step from any other epoch


@dataclass(frozen=True)
class TokenLogprobs:
    logprob: float
    top_token_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclass(frozen=True)
class RequestResult:
    request_id: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] = ()
    error: str = ""


@dataclass(frozen=True)
class StepResult:
    step_id: int
    outputs: tuple[RequestResult, ...] = field(default_factory=tuple)
    execute_duration_s: float = 0.0
    num_requests: int = 0  # scheduled in this step
    num_prefill_tokens: int = 0  # tokens at prompt positions
    num_decode_tokens: int = 0  # tokens at generated positions (decodes, and their recomputation)
