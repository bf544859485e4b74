"""Admission: turns a client's generation request into a scheduler `Request`, or refuses it.

The tokenizer validates too, but the scheduler is a service of its own with other callers (tests,
benchmarks, future front doors), so every field is checked here again before anything is queued.
Unset sampling fields take the OpenAI defaults (temperature 1, top_p 1, max_tokens 16). Each
refusal names the field, as DESIGN.md's error table requires.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.scheduler.request import Request
from shared.sampling_rules import SamplingParams
from shared.errors import InvalidArgument
from shared.sampling_rules import SamplingFields, check_logit_bias, check_sampling_scalars

DEFAULT_MAX_TOKENS = 16


ClientSampling = SamplingFields  # as the client sent them; stop strings are the front door's, left empty


@dataclass(frozen=True)
class Submission:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: ClientSampling
    session_id: str = ""
    cache_salt: str = ""
    priority: int = 0
    timeout_s: float | None = None  # from the call's gRPC deadline
    # A request resumed after its scheduler went away: the tokens its client already has, and the
    # pool they came from (see GenerateRequest.resume_output_token_ids).
    resume_output_token_ids: tuple[int, ...] = ()
    resume_pool: str = ""
    sequence_group: str = ""  # n > 1 at the front door: requests of one group go to one worker
    grammar: str = ""  # llguidance grammar the worker keeps the output inside; "" is free text


@dataclass(frozen=True)
class ModelLimits:
    """What a request must fit: the smallest limits among the workers it could land on."""

    max_model_len: int
    vocab_size: int
    max_tokens_per_request: int  # KV capacity of one worker, in tokens


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidArgument(message, field=field)


def resolve_sampling(s: ClientSampling, vocab_size: int) -> tuple[SamplingParams, int]:
    """Validates the client's sampling fields; returns the worker's sampling and max_tokens."""
    check_sampling_scalars(s)
    bad_stop = [t for t in s.stop_token_ids if not 0 <= t < vocab_size]
    _check(not bad_stop, "sampling.stop_token_ids", f"ids must be in [0, {vocab_size}), got {bad_stop[:5]}")
    check_logit_bias(s.logit_bias, vocab_size)
    # One request is one sequence here: the front door fans n out into n requests of n=1.
    _check(s.n is None or s.n == 1, "sampling.n",
           f"the scheduler runs one sequence per request, got n={s.n}; send n > 1 to the front door")
    sampling = SamplingParams(
        temperature=1.0 if s.temperature is None else s.temperature,
        top_k=s.top_k or 0,
        top_p=1.0 if s.top_p is None else s.top_p,
        min_p=s.min_p or 0.0,
        repetition_penalty=1.0 if s.repetition_penalty is None else s.repetition_penalty,
        presence_penalty=s.presence_penalty or 0.0,
        frequency_penalty=s.frequency_penalty or 0.0,
        seed=s.seed,
        return_logprobs=s.logprobs is not None,
        num_logprobs=s.logprobs or 0,
        logit_bias=s.logit_bias,
    )
    return sampling, DEFAULT_MAX_TOKENS if s.max_tokens is None else s.max_tokens


def build_request(sub: Submission, limits: ModelLimits, now_s: float) -> Request:
    """Validates a submission against the model's limits and returns a WAITING request."""
    _check(bool(sub.request_id), "request_id", "must not be empty")
    num_prompt_tokens = len(sub.prompt_token_ids)
    _check(num_prompt_tokens > 0, "prompt_token_ids", "must not be empty")
    bad = [t for t in sub.prompt_token_ids if not 0 <= t < limits.vocab_size]
    _check(not bad, "prompt_token_ids", f"ids must be in [0, {limits.vocab_size}), got {bad[:5]}")
    sampling, max_tokens = resolve_sampling(sub.sampling, limits.vocab_size)
    total = num_prompt_tokens + max_tokens
    _check(total <= limits.max_model_len, "sampling.max_tokens",
           f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} exceeds the model's "
           f"maximum length of {limits.max_model_len} tokens")
    _check(total <= limits.max_tokens_per_request, "sampling.max_tokens",
           f"prompt + max_tokens = {total} tokens exceeds one worker's KV cache of "
           f"{limits.max_tokens_per_request} tokens")
    _check(sub.timeout_s is None or sub.timeout_s > 0, "deadline", "already passed")
    resumed = sub.resume_output_token_ids
    bad = [t for t in resumed if not 0 <= t < limits.vocab_size]
    _check(not bad, "resume_output_token_ids", f"ids must be in [0, {limits.vocab_size}), got {bad[:5]}")
    _check(len(resumed) < max_tokens, "resume_output_token_ids",
           f"{len(resumed)} tokens already streamed leave nothing of max_tokens ({max_tokens}) to generate")
    return Request(
        request_id=sub.request_id,
        prompt_token_ids=list(sub.prompt_token_ids),
        sampling=sampling,
        max_tokens=max_tokens,
        stop_token_ids=frozenset(sub.sampling.stop_token_ids),
        ignore_eos=bool(sub.sampling.ignore_eos),
        priority=sub.priority,
        arrival_s=now_s,
        deadline_s=None if sub.timeout_s is None else now_s + sub.timeout_s,
        session_id=sub.session_id,
        cache_salt=sub.cache_salt,
        output_token_ids=list(resumed),  # they count against max_tokens; the worker recomputes their KV
        grammar=sub.grammar,
    )
