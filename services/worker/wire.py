"""The only worker module that touches protobuf: converts `switchyard.worker.v1` to and from
the plain dataclasses of `step.py`."""

from __future__ import annotations

from switchyard.worker.v1 import worker_pb2 as pb

from services.worker.model_runner import ModelSpec
from shared.sampling_rules import SamplingParams, logit_bias_pairs
from services.worker.step import CachedRequestData, NewRequestData, StepInput, StepResult
from shared.errors import InvalidArgument


def sampling_from_pb(msg: pb.SamplingParams, field: str = "sampling") -> SamplingParams:
    try:
        return _sampling_from_pb(msg)
    except ValueError as e:  # SamplingParams names the bad field; we add where it sits
        raise InvalidArgument(f"{field}.{e}", field=field) from e


def _sampling_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p,
        min_p=msg.min_p,
        repetition_penalty=msg.repetition_penalty,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        seed=msg.seed if msg.HasField("seed") else None,
        return_logprobs=msg.return_logprobs,
        num_logprobs=msg.num_logprobs,
        logit_bias=logit_bias_pairs(msg.logit_bias),
    )


def sampling_to_pb(params: SamplingParams) -> pb.SamplingParams:
    # The dataclass's fields are the message's, by name; the bias pairs become the message's map.
    return pb.SamplingParams(**(vars(params) | {"logit_bias": dict(params.logit_bias)}))


def step_from_pb(msg: pb.StepRequest) -> StepInput:
    return StepInput(
        step_id=msg.step_id,
        new_requests=tuple(
            NewRequestData(
                request_id=r.request_id,
                prompt_token_ids=tuple(r.prompt_token_ids),
                output_token_ids=tuple(r.output_token_ids),
                sampling=sampling_from_pb(r.sampling, f"new_requests[{r.request_id}].sampling"),
                block_ids=tuple(r.block_ids),
                num_computed_tokens=r.num_computed_tokens,
                num_scheduled_tokens=r.num_scheduled_tokens,
                trace_context=r.trace_context,
                grammar=r.grammar,
            )
            for r in msg.new_requests
        ),
        cached_requests=tuple(
            CachedRequestData(
                request_id=r.request_id,
                new_block_ids=tuple(r.new_block_ids),
                num_scheduled_tokens=r.num_scheduled_tokens,
                num_computed_tokens=r.num_computed_tokens,
                draft_token_ids=tuple(r.draft_token_ids),
            )
            for r in msg.cached_requests
        ),
        finished_request_ids=tuple(msg.finished_request_ids),
        copies_to_host=tuple((c.source_block_id, c.destination_block_id) for c in msg.copies_to_host),
        copies_to_device=tuple((c.source_block_id, c.destination_block_id) for c in msg.copies_to_device),
        scheduler_epoch=msg.scheduler_epoch,
    )


def step_to_pb(step: StepInput) -> pb.StepRequest:
    """Used by the scheduler's worker client and by tests that drive a worker directly."""
    return pb.StepRequest(
        step_id=step.step_id,
        new_requests=[
            pb.NewRequest(
                request_id=r.request_id, prompt_token_ids=r.prompt_token_ids,
                output_token_ids=r.output_token_ids, sampling=sampling_to_pb(r.sampling),
                block_ids=r.block_ids, num_computed_tokens=r.num_computed_tokens,
                num_scheduled_tokens=r.num_scheduled_tokens, trace_context=r.trace_context, grammar=r.grammar,
            )
            for r in step.new_requests
        ],
        cached_requests=[
            pb.CachedRequest(
                request_id=r.request_id, new_block_ids=r.new_block_ids,
                num_scheduled_tokens=r.num_scheduled_tokens, num_computed_tokens=r.num_computed_tokens or 0,
                draft_token_ids=r.draft_token_ids,
            )
            for r in step.cached_requests
        ],
        finished_request_ids=step.finished_request_ids,
        copies_to_host=[pb.BlockCopy(source_block_id=s, destination_block_id=d) for s, d in step.copies_to_host],
        copies_to_device=[pb.BlockCopy(source_block_id=s, destination_block_id=d) for s, d in step.copies_to_device],
        scheduler_epoch=step.scheduler_epoch,
    )


def result_to_pb(result: StepResult, *, draining: bool = False) -> pb.StepResponse:
    return pb.StepResponse(
        step_id=result.step_id,
        execute_duration_s=result.execute_duration_s,
        draining=draining,
        outputs=[
            pb.RequestOutput(
                request_id=o.request_id,
                token_ids=o.token_ids,
                error=o.error,
                logprobs=[
                    pb.TokenLogprob(logprob=lp.logprob, top_token_ids=lp.top_token_ids, top_logprobs=lp.top_logprobs)
                    for lp in o.logprobs
                ],
            )
            for o in result.outputs
        ],
    )


WORKER_SERVICE = pb.DESCRIPTOR.services_by_name["Worker"].full_name


def reset_epoch_from_pb(msg: pb.ResetRequest) -> int:
    return msg.scheduler_epoch


def reset_response_to_pb(num_dropped_requests: int) -> pb.ResetResponse:
    return pb.ResetResponse(num_dropped_requests=num_dropped_requests)


def info_to_pb(spec: ModelSpec, *, block_size: int, num_blocks: int, version: str, device: str,
               attention_backend: str, num_host_blocks: int = 0) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        model=spec.name, dtype=spec.dtype, block_size=block_size, num_blocks=num_blocks,
        max_model_len=spec.max_model_len, version=version, vocab_size=spec.vocab_size,
        eos_token_ids=spec.eos_token_ids, device=device, attention_backend=attention_backend,
        num_host_blocks=num_host_blocks,
    )
