"""The only scheduler module that touches protobuf: the public request and token events on one
side, the worker's Step contract on the other."""

from __future__ import annotations

import uuid

from switchyard.api.v1 import generation_pb2 as api_pb
from switchyard.scheduler.v1 import scheduler_pb2 as pb
from switchyard.worker.v1 import worker_pb2 as worker_pb

from services.scheduler.admission import ClientSampling, Submission
from services.scheduler.canary import PoolView
from services.scheduler.plan import Outgoing, RequestEvent, RequestOutput, StepPlan
from services.scheduler.request import FinishReason, Request, TokenLogprob
from services.scheduler.worker_spec import WorkerSpec
from shared.errors import ResourceExhausted
from shared.grpc_errors import status_code_for
from shared.sampling_rules import SCALAR_FIELDS, SamplingParams, logit_bias_pairs


_FINISH_TO_PB = {
    None: api_pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: api_pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: api_pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: api_pb.FINISH_REASON_ABORT,
}


def client_sampling_from_pb(s: api_pb.SamplingParams) -> ClientSampling:
    scalars = {name: getattr(s, name) if s.HasField(name) else None for name in SCALAR_FIELDS}
    return ClientSampling(**scalars, stop_token_ids=tuple(s.stop_token_ids), logit_bias=logit_bias_pairs(s.logit_bias))


def submission_from_pb(msg: pb.GenerateRequest, timeout_s: float | None) -> Submission:
    return Submission(
        request_id=msg.request_id or uuid.uuid4().hex,  # a backend may leave the id to us
        prompt_token_ids=tuple(msg.prompt_token_ids),
        sampling=client_sampling_from_pb(msg.sampling),
        session_id=msg.session_id,
        cache_salt=msg.cache_salt,
        priority=msg.priority,
        timeout_s=timeout_s,
        resume_output_token_ids=tuple(msg.resume_output_token_ids),
        resume_pool=msg.resume_pool,
        sequence_group=msg.sequence_group,
        grammar=msg.grammar,
    )


def submissions_from_pb(msg: pb.ConnectRequest) -> list[tuple[Submission, str]]:
    """A Connect message's new requests, each with the traceparent it brought."""
    # A bad timeout is one request's problem: admission refuses that request, not the stream.
    return [(submission_from_pb(r, r.timeout_s or None), r.traceparent) for r in msg.submissions]


def outgoing_to_pb(outgoing: Outgoing) -> pb.ConnectResponse:
    events = []
    for d in outgoing.deliveries:
        e = d.event
        msg = pb.TokenEvent(
            request_id=e.request_id, token_ids=e.token_ids, finish_reason=_FINISH_TO_PB[e.finish_reason],
            num_prompt_tokens=d.num_prompt_tokens, num_cached_tokens=d.num_cached_tokens,
            num_output_tokens=d.num_output_tokens, pool=d.pool, model_version=d.model_version,
        )
        if e.logprobs:
            msg.logprobs.extend(_logprob_to_api(lp) for lp in e.logprobs)
        if d.error is not None:
            msg.error_code = status_code_for(type(d.error)).value[0]
            msg.error_message = d.error.message
            msg.error_field = d.error.field or ""
            if isinstance(d.error, ResourceExhausted):
                msg.retry_after_s = d.error.retry_after_s
            msg.resubmit = d.resubmit
        events.append(msg)
    response = pb.ConnectResponse(events=events)
    if outgoing.routable is not None:  # an empty set is still set: every pool at weight 0
        response.routable.SetInParent()
        response.routable.pools.extend(pb.ServingPool(name=name, version=version)
                                       for name, version in outgoing.routable)
    return response


def _logprob_to_api(lp: TokenLogprob) -> api_pb.TokenLogprob:
    return api_pb.TokenLogprob(logprob=lp.logprob, top_token_ids=lp.top_token_ids, top_logprobs=lp.top_logprobs)


def event_to_pb(event: RequestEvent, request: Request, pool: str = "", model_version: str = "") -> pb.TokenEvent:
    return pb.TokenEvent(
        request_id=event.request_id,
        token_ids=event.token_ids,
        logprobs=[_logprob_to_api(lp) for lp in event.logprobs],
        finish_reason=_FINISH_TO_PB[event.finish_reason],
        # Sent on every event, not only the last: a front door that stops early (stop string) still
        # reports cached tokens in its usage.
        num_prompt_tokens=request.num_prompt_tokens,
        num_cached_tokens=request.num_cached_tokens,
        num_output_tokens=len(request.output_token_ids),
        pool=pool, model_version=model_version,
    )


def _sampling_to_worker(s: SamplingParams) -> worker_pb.SamplingParams:
    # The dataclass's fields are the message's, by name; the bias pairs become the message's map.
    return worker_pb.SamplingParams(**(vars(s) | {"logit_bias": dict(s.logit_bias)}))


def plan_to_pb(plan: StepPlan, scheduler_epoch: int = 0) -> worker_pb.StepRequest:
    return worker_pb.StepRequest(
        step_id=plan.step_id,
        scheduler_epoch=scheduler_epoch,
        new_requests=[
            worker_pb.NewRequest(
                request_id=n.request.request_id,
                prompt_token_ids=n.request.prompt_token_ids,
                output_token_ids=n.request.output_token_ids,
                sampling=_sampling_to_worker(n.request.sampling),
                block_ids=n.block_ids,
                num_computed_tokens=n.num_computed_tokens,
                num_scheduled_tokens=n.num_scheduled_tokens,
                trace_context=n.request.trace_context,
                grammar=n.request.grammar,
            )
            for n in plan.new_requests
        ],
        cached_requests=[
            worker_pb.CachedRequest(
                request_id=c.request_id, new_block_ids=c.new_block_ids,
                num_scheduled_tokens=c.num_scheduled_tokens, num_computed_tokens=c.num_computed_tokens,
                draft_token_ids=c.draft_token_ids,
            )
            for c in plan.cached_requests
        ],
        finished_request_ids=plan.finished_request_ids,
        copies_to_host=[worker_pb.BlockCopy(source_block_id=s, destination_block_id=d) for s, d in plan.copies_to_host],
        copies_to_device=[worker_pb.BlockCopy(source_block_id=s, destination_block_id=d)
                          for s, d in plan.copies_to_device],
    )


def outputs_from_pb(msg: worker_pb.StepResponse) -> list[RequestOutput]:
    return [
        RequestOutput(
            request_id=o.request_id,
            token_ids=tuple(o.token_ids),
            logprobs=tuple(
                TokenLogprob(lp.logprob, tuple(lp.top_token_ids), tuple(lp.top_logprobs)) for lp in o.logprobs
            ) if o.logprobs else (),
            error=o.error,
        )
        for o in msg.outputs
    ]


def step_reply_from_pb(msg: worker_pb.StepResponse) -> tuple[list[RequestOutput], bool]:
    """A step's outputs, and whether the worker said it is draining."""
    return outputs_from_pb(msg), msg.draining


SCHEDULER_SERVICE = pb.DESCRIPTOR.services_by_name["Scheduler"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["SchedulerAdmin"].full_name


def abort_response_to_pb(found: bool) -> pb.AbortResponse:
    return pb.AbortResponse(found=found)


INFO_REQUEST = worker_pb.InfoRequest()
def reset_request(scheduler_epoch: int) -> worker_pb.ResetRequest:
    return worker_pb.ResetRequest(scheduler_epoch=scheduler_epoch)


def worker_spec_from_pb(msg: worker_pb.WorkerInfo) -> WorkerSpec:
    return WorkerSpec(
        model=msg.model, version=msg.version, block_size=msg.block_size, num_blocks=msg.num_blocks,
        max_model_len=msg.max_model_len, vocab_size=msg.vocab_size, eos_token_ids=tuple(msg.eos_token_ids),
        num_host_blocks=msg.num_host_blocks,
    )


_ROLE_TO_PB = {"leader": pb.SCHEDULER_ROLE_LEADER, "standby": pb.SCHEDULER_ROLE_STANDBY}


def stats_to_pb(workers: list[dict], pools: list[dict], num_live_requests: int,
                role: tuple[str, int, str] = ("leader", 0, "")) -> pb.SchedulerStats:
    """`role`: (role name, epoch, the leader's address) as the leadership says."""
    return pb.SchedulerStats(
        workers=[pb.WorkerStats(**w) for w in workers],
        pools=[pb.PoolStats(**p) for p in pools],
        num_live_requests=num_live_requests,
        role=_ROLE_TO_PB[role[0]], scheduler_epoch=role[1], leader=role[2],
    )


def pool_view_to_pb(view: PoolView) -> pb.PoolStatus:
    return pb.PoolStatus(
        name=view.name, version=view.version, weight=view.weight, worker_addresses=view.worker_addresses,
        num_workers_up=view.num_workers_up, dns=view.dns, rolled_back=view.rolled_back,
        rollback_reason=view.rollback_reason, num_window_requests=view.window.num_requests,
        num_window_errors=view.window.num_errors, window_ttft_p99_s=view.window.ttft_p99_s or 0.0,
    )


def pools_to_pb(views: list[PoolView], baseline_pool: str, rollback_enabled: bool,
                rollback_window_s: float) -> pb.ListPoolsResponse:
    return pb.ListPoolsResponse(pools=[pool_view_to_pb(v) for v in views], baseline_pool=baseline_pool,
                                rollback_enabled=rollback_enabled, rollback_window_s=rollback_window_s)
