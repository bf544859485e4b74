"""The only front-door module that touches protobuf: the public API on one side, the scheduler's
stream on the other."""

from __future__ import annotations

import functools

from switchyard.api.v1 import generation_pb2 as api_pb
from switchyard.scheduler.v1 import scheduler_pb2 as sched_pb

from services.tokenizer.api_types import (
    ChatMessage, GenerateChunk, GenerateInput, ResponseFormat, SamplingInput, SchedulerEvent, ServingPool,
    TokenLogprob,
)
from shared.errors import InvalidArgument, SwitchyardError
from shared.grpc_errors import error_from_status, status_from_number
from shared.sampling_rules import SCALAR_FIELDS, logit_bias_pairs

_FINISH_FROM_PB = {
    api_pb.FINISH_REASON_UNSPECIFIED: None,
    api_pb.FINISH_REASON_STOP: "stop",
    api_pb.FINISH_REASON_LENGTH: "length",
    api_pb.FINISH_REASON_ABORT: "abort",
}
_FINISH_TO_PB = {v: k for k, v in _FINISH_FROM_PB.items()}


def sampling_from_pb(s: api_pb.SamplingParams) -> SamplingInput:
    scalars = {name: getattr(s, name) if s.HasField(name) else None for name in SCALAR_FIELDS}
    return SamplingInput(**scalars, stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
                         logit_bias=logit_bias_pairs(s.logit_bias))


def sampling_to_pb(s: SamplingInput) -> api_pb.SamplingParams:
    scalars = {name: getattr(s, name) for name in SCALAR_FIELDS if getattr(s, name) is not None}
    return api_pb.SamplingParams(**scalars, stop=s.stop, stop_token_ids=s.stop_token_ids,
                                 logit_bias=dict(s.logit_bias))


GENERATION_SERVICE = api_pb.DESCRIPTOR.services_by_name["Generation"].full_name


def generate_input_from_pb(msg: api_pb.GenerateRequest, timeout_s: float | None,
                           max_request_bytes: int | None = None) -> GenerateInput:
    if max_request_bytes is not None and (size := msg.ByteSize()) > max_request_bytes:
        raise InvalidArgument(f"request is {size} bytes, over the {max_request_bytes}-byte cap", field="request")
    which = msg.WhichOneof("input")
    return GenerateInput(
        request_id=msg.request_id,
        prompt=msg.prompt if which == "prompt" else None,
        messages=tuple(ChatMessage(m.role, m.content) for m in msg.messages.messages) if which == "messages" else None,
        prompt_token_ids=tuple(msg.prompt_token_ids.ids) if which == "prompt_token_ids" else None,
        sampling=sampling_from_pb(msg.sampling),
        session_id=msg.session_id,
        cache_salt=msg.cache_salt,
        priority=msg.priority,
        timeout_s=timeout_s,
        response_format=(ResponseFormat(msg.response_format.type or "text", msg.response_format.json_schema)
                         if msg.HasField("response_format") else None),
    )


def tokenize_input_from_pb(msg: api_pb.TokenizeRequest) -> tuple[str | None, list[ChatMessage] | None, bool]:
    """(prompt, messages, add_special_tokens): exactly one of the first two is set."""
    which = msg.WhichOneof("input")
    if which is None:
        raise InvalidArgument("give prompt or messages", field="prompt")
    if which == "messages":
        return None, [ChatMessage(m.role, m.content) for m in msg.messages.messages], msg.add_special_tokens
    return msg.prompt, None, msg.add_special_tokens


def tokenize_response_to_pb(token_ids: list[int]) -> api_pb.TokenizeResponse:
    return api_pb.TokenizeResponse(token_ids=token_ids, num_tokens=len(token_ids))


def model_info_to_pb(model: str, max_model_len: int, vocab_size: int, version: str) -> api_pb.ModelInfo:
    return api_pb.ModelInfo(model=model, max_model_len=max_model_len, vocab_size=vocab_size, version=version)


def chunk_to_pb(chunk: GenerateChunk) -> api_pb.GenerateResponse:
    response = api_pb.GenerateResponse(
        request_id=chunk.request_id, text=chunk.text, token_ids=chunk.token_ids,
        logprobs=[api_pb.TokenLogprob(logprob=lp.logprob, top_token_ids=lp.top_token_ids, top_logprobs=lp.top_logprobs)
                  for lp in chunk.logprobs],
        finish_reason=_FINISH_TO_PB[chunk.finish_reason], index=chunk.index,
    )
    if chunk.usage is not None:
        response.usage.CopyFrom(api_pb.Usage(prompt_tokens=chunk.usage.prompt_tokens,
                                             completion_tokens=chunk.usage.completion_tokens,
                                             cached_tokens=chunk.usage.cached_tokens))
    return response


def scheduler_request_to_pb(request_id: str, prompt_token_ids: list[int], inp: GenerateInput,
                            traceparent: str = "", *, timeout_s: float | None = None,
                            resume_output_token_ids: list[int] | tuple[int, ...] = (),
                            resume_pool: str = "") -> sched_pb.GenerateRequest:
    """`timeout_s`: what is left of the request's own (a resubmission's is shorter)."""
    sampling = sampling_to_pb(inp.sampling)
    del sampling.stop[:]  # stop strings are the front door's; the scheduler never sees text
    return sched_pb.GenerateRequest(
        request_id=request_id, prompt_token_ids=prompt_token_ids, sampling=sampling,
        session_id=inp.session_id, cache_salt=inp.cache_salt, priority=inp.priority,
        traceparent=traceparent, timeout_s=(inp.timeout_s if timeout_s is None else timeout_s) or 0.0,
        resume_output_token_ids=resume_output_token_ids, resume_pool=resume_pool,
        sequence_group=inp.sequence_group, grammar=inp.grammar,
    )


def connect_request_to_pb(submissions: list[sched_pb.GenerateRequest], abort_request_ids: list[str],
                          ) -> sched_pb.ConnectRequest:
    return sched_pb.ConnectRequest(submissions=submissions, abort_request_ids=abort_request_ids)


def routable_from_pb(msg: sched_pb.ConnectResponse) -> frozenset[ServingPool] | None:
    """The routable pools a Connect message announces; None when it announces nothing (unchanged)."""
    if not msg.HasField("routable"):
        return None
    return frozenset(_serving_pool(p.name, p.version) for p in msg.routable.pools)


@functools.lru_cache(maxsize=256)
def _serving_pool(name: str, version: str) -> ServingPool | None:
    # One object per pool, not one per token event; an event of a request never placed names none.
    return ServingPool(name, version) if name else None


def scheduler_events_from_pb(msg: sched_pb.ConnectResponse,
                             ) -> list[tuple[str, SchedulerEvent | None, SwitchyardError | None, bool]]:
    """Each event of a Connect message: its request id, either the event or the request's error, and
    whether the request may go to another scheduler at once (refused by one stepping down)."""
    return [(e.request_id, None, scheduler_error_from_pb(e), e.resubmit) if e.error_code
            else (e.request_id, scheduler_event_from_pb(e), None, False) for e in msg.events]


def scheduler_error_from_pb(msg: sched_pb.TokenEvent) -> SwitchyardError:
    """The typed error a failed request's last event on the Connect stream carries."""
    return error_from_status(status_from_number(msg.error_code), msg.error_message, msg.error_field or None,
                             msg.retry_after_s or None)


def scheduler_event_from_pb(msg: sched_pb.TokenEvent) -> SchedulerEvent:
    return SchedulerEvent(
        token_ids=tuple(msg.token_ids),
        logprobs=tuple(TokenLogprob(lp.logprob, tuple(lp.top_token_ids), tuple(lp.top_logprobs)) for lp in msg.logprobs),
        finish_reason=_FINISH_FROM_PB[msg.finish_reason],
        num_prompt_tokens=msg.num_prompt_tokens,
        num_cached_tokens=msg.num_cached_tokens,
        served_by=_serving_pool(msg.pool, msg.model_version),
    )
