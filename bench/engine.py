"""Our own engine in one thread: the scheduler core driving the worker core, no gRPC, no processes.

`run_in_process` is the reference for "what the services cost": the same BlockManager + Batcher
the scheduler runs and the same Executor + ModelRunner (or `NullModelRunner`) the worker runs, in a
plain loop of schedule → execute → update. The stack's throughput divided by this one's is the
price of tokenizer, scheduler and worker being separate gRPC services.

Admission (shared with the Hugging Face peers, `Admission`): a request is sent once its arrival
time has passed (open loop, `workload.request_rate`) and, in a closed loop (`workload.concurrency`),
once fewer than `concurrency` requests are in flight; the next request goes in when one finishes.
Its `start_s` is the later of the two moments, so a request that arrives while a step computes
counts that wait in its TTFT, as it would for a client of a busy server. Every request is greedy
with `ignore_eos` and runs to its own `max_tokens`. A token's time is `time.perf_counter()` at the
end of the step that produced it (after the batcher took it, i.e. when a server could send it).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.records import RequestRecord
from bench.workload import Workload, WorkloadRequest
from services.scheduler.batcher import Batcher
from services.scheduler.block_manager import BlockManager
from services.scheduler.plan import RequestOutput, StepPlan
from services.scheduler.request import Request, TokenLogprob
from services.worker.executor import Executor
from services.worker.sampler import SamplingParams
from services.worker.step import CachedRequestData, NewRequestData, StepInput, StepResult
from shared.errors import SwitchyardError

GREEDY = SamplingParams(temperature=0.0)
_WARMUP_ID = "__warmup__"


class Admission:
    """When each workload request is sent, for closed-loop, open-loop and mixed workloads.

    Requests go out in workload order. `due(now)` hands back those that may be sent by `now`, each
    with its send time; `release(t)` frees a closed-loop slot at time `t` (a request finished).
    With neither concurrency nor a request rate, everything is sent at `t0` (an offline batch).
    """

    def __init__(self, workload: Workload, t0: float) -> None:
        self.t0 = t0
        self._pending: deque[WorkloadRequest] = deque(workload.requests)
        concurrency = workload.concurrency
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"workload.concurrency must be >= 1, got {concurrency}")
        self._slots: deque[float] | None = (
            None if concurrency is None else deque([t0] * min(concurrency, len(self._pending))))
        self.num_in_flight = 0

    @property
    def exhausted(self) -> bool:
        """Every request has been sent."""
        return not self._pending

    def due(self, now: float) -> list[tuple[WorkloadRequest, float]]:
        out = []
        while self._pending:
            arrive = self.t0 + self._pending[0].arrival_s
            if arrive > now or (self._slots is not None and not self._slots):
                break
            slot_s = self._slots.popleft() if self._slots is not None else self.t0
            out.append((self._pending.popleft(), max(arrive, slot_s)))
        self.num_in_flight += len(out)
        return out

    def release(self, t: float) -> None:
        self.num_in_flight -= 1
        if self._slots is not None:
            self._slots.append(t)

    def next_arrival_s(self) -> float | None:
        """When the next request becomes due without any request finishing; None if it needs one to."""
        if not self._pending or (self._slots is not None and not self._slots):
            return None
        return self.t0 + self._pending[0].arrival_s


def plan_to_step(plan: StepPlan) -> StepInput:
    """The scheduler's StepPlan as the worker's StepInput: what `wire.plan_to_pb` + the worker's
    `wire.step_from_pb` do through protobuf, without it. Token lists are copied (the batcher keeps
    appending to the live request after the plan is made)."""
    return StepInput(
        step_id=plan.step_id,
        new_requests=tuple(
            NewRequestData(
                request_id=n.request.request_id,
                prompt_token_ids=tuple(n.request.prompt_token_ids),
                output_token_ids=tuple(n.request.output_token_ids),
                sampling=n.request.sampling,  # one SamplingParams on both sides
                block_ids=tuple(n.block_ids),
                num_computed_tokens=n.num_computed_tokens,
                num_scheduled_tokens=n.num_scheduled_tokens,
                trace_context=n.request.trace_context,
            )
            for n in plan.new_requests
        ),
        cached_requests=tuple(
            CachedRequestData(
                request_id=c.request_id, new_block_ids=tuple(c.new_block_ids),
                num_scheduled_tokens=c.num_scheduled_tokens, num_computed_tokens=c.num_computed_tokens,
            )
            for c in plan.cached_requests
        ),
        finished_request_ids=tuple(plan.finished_request_ids),
    )


def result_to_outputs(result: StepResult) -> list[RequestOutput]:
    """The worker's StepResult as the Batcher's RequestOutputs (the other half of the wire)."""
    return [
        RequestOutput(
            request_id=o.request_id,
            token_ids=tuple(o.token_ids),
            logprobs=tuple(TokenLogprob(lp.logprob, tuple(lp.top_token_ids), tuple(lp.top_logprobs))
                           for lp in o.logprobs),
            error=o.error,
        )
        for o in result.outputs
    ]


def make_runner(model_dir: str | Path, *, null_model: bool = False, num_blocks: int | None = None,
                block_size: int = 16, dtype: str = "float32"):  # noqa: ANN201 (ModelRunner or NullModelRunner)
    if null_model:
        from services.worker.null_runner import NullModelRunner  # noqa: PLC0415

        return NullModelRunner(model_dir, dtype=dtype, block_size=block_size, num_blocks=num_blocks)
    from services.worker.model_runner import ModelRunner  # noqa: PLC0415

    return ModelRunner(model_dir, dtype=dtype, block_size=block_size, num_blocks=num_blocks)


def _warm_up(executor: Executor, prompt: Sequence[int]) -> None:
    """One prefill and one decode outside the timed run: torch's lazy start is not what we measure.
    The request is dropped at the end, so the executor is empty when the batcher takes over."""
    num_blocks = -(-(len(prompt) + 1) // executor.runner.block_size)
    new = NewRequestData(_WARMUP_ID, tuple(prompt), (), GREEDY, tuple(range(1, 1 + num_blocks)), 0, len(prompt))
    executor.execute(StepInput(1, new_requests=(new,)))
    executor.execute(StepInput(2, cached_requests=(CachedRequestData(_WARMUP_ID, (), 1, len(prompt)),)))
    executor.execute(StepInput(3, finished_request_ids=(_WARMUP_ID,)))


def _warmup_prompt(workload: Workload, num_blocks: int, block_size: int) -> list[int]:
    first = workload.requests[0].prompt_token_ids if workload.requests else (1,)
    room = (num_blocks - 1) * block_size - 1  # usable blocks, one slot left for the decode
    return list(first[: max(1, min(len(first), room))])


def run_in_process(
    model_dir: str | Path,
    workload: Workload,
    *,
    null_model: bool = False,
    num_threads: int | None = None,
    max_num_batched_tokens: int = 2048,
    max_num_seqs: int = 128,
    num_blocks: int | None = None,
    block_size: int = 16,
    enable_prefix_caching: bool = True,
    warmup: bool = True,
) -> tuple[list[RequestRecord], float]:
    """Runs `workload` through BlockManager + Batcher + Executor in this thread.

    Returns one record per workload request (in workload order) and the wall time from the first
    send to the last token. `num_blocks=None` sizes the KV pool the way the worker does by default
    (256 MiB). The model is loaded and warmed up before the clock starts.
    """
    previous_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        runner = make_runner(model_dir, null_model=null_model, num_blocks=num_blocks, block_size=block_size)
        executor = Executor(runner)
        if warmup:
            _warm_up(executor, _warmup_prompt(workload, runner.num_blocks, runner.block_size))
        manager = BlockManager(runner.num_blocks, runner.block_size, "v1", enable_prefix_caching)
        batcher = Batcher(manager, max_model_len=runner.spec.max_model_len, eos_token_ids=runner.spec.eos_token_ids,
                          max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)
        return _drive(batcher, executor, workload)
    finally:
        torch.set_num_threads(previous_threads)


def _drive(batcher: Batcher, executor: Executor, workload: Workload) -> tuple[list[RequestRecord], float]:
    records: dict[str, RequestRecord] = {}
    live: dict[str, Request] = {}
    t0 = time.perf_counter()
    admission = Admission(workload, t0)
    last_s = t0
    while not admission.exhausted or admission.num_in_flight:
        now = time.perf_counter()
        for wr, start_s in admission.due(now):
            record = records[wr.request_id] = RequestRecord(wr.request_id, len(wr.prompt_token_ids), start_s)
            request = Request(wr.request_id, list(wr.prompt_token_ids), GREEDY, wr.max_tokens,
                              ignore_eos=True, arrival_s=start_s, session_id=wr.session_id)
            try:
                batcher.add(request)
                live[wr.request_id] = request
            except SwitchyardError as e:
                record.error, record.end_s = str(e), now
                admission.release(now)
                last_s = max(last_s, now)
        plan = batcher.schedule()
        if plan.is_empty:
            if admission.num_in_flight:  # live requests but nothing schedulable: cannot happen
                raise RuntimeError(f"the batcher scheduled nothing with {admission.num_in_flight} requests "
                                   "in flight")
            next_s = admission.next_arrival_s()
            if next_s is not None:
                time.sleep(max(0.0, next_s - time.perf_counter()))
            continue
        result = executor.execute(plan_to_step(plan))
        events = batcher.update(plan, result_to_outputs(result))
        t = time.perf_counter()
        for event in events:
            record = records[event.request_id]
            record.output_token_ids.extend(event.token_ids)
            record.token_times_s.extend([t] * len(event.token_ids))
            if event.error:
                record.error = event.error
            if event.finish_reason is not None:
                record.end_s = t
                record.num_cached_tokens = live.pop(event.request_id).num_cached_tokens
                admission.release(t)
                last_s = t
    return [records[r.request_id] for r in workload.requests], last_s - t0
