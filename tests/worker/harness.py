"""A minimal stand-in for the scheduler, so worker tests can drive real steps.

It allocates blocks first-fit from a LIFO free list (a freed block is the next one handed out,
which is what makes block-reuse bugs visible), splits prompts into chunks under a token budget,
admits requests at chosen steps (so prefills mix with running decodes), and stops each request
after `max_tokens`. It is test code: the real scheduler lives in services/scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from services.worker.sampler import SamplingParams
from services.worker.step import CachedRequestData, NewRequestData, StepInput, StepResult, TokenLogprobs

GREEDY = SamplingParams(temperature=0.0)


@dataclass
class Job:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = GREEDY
    arrival_step: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    sent: bool = False
    num_prefill_steps: int = 0  # steps that computed part of the prompt (chunked prefill)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


class MiniScheduler:
    def __init__(self, *, block_size: int, num_blocks: int, token_budget: int = 64) -> None:
        self.block_size = block_size
        self.free_blocks = list(range(num_blocks - 1, 0, -1))  # pop() hands out 1, 2, 3, ...
        self.token_budget = token_budget
        self.num_steps = 0
        self.batch_shapes: list[tuple[int, int]] = []  # (prefill tokens, decode tokens) per step

    def run(self, execute: Callable[[StepInput], StepResult], jobs: Sequence[Job]) -> dict[str, Job]:
        pending = sorted(jobs, key=lambda j: j.arrival_step)
        running: list[Job] = []
        finished_ids: list[str] = []
        step_id = 0
        while pending or running:
            while pending and pending[0].arrival_step <= step_id:
                running.append(pending.pop(0))
            step, scheduled = self._schedule(step_id, running, finished_ids)
            finished_ids = []
            if scheduled:
                result = execute(step)
                by_id = {o.request_id: o for o in result.outputs}
                for job in scheduled:
                    job.num_computed_tokens += self._num_scheduled[job.request_id]
                    out = by_id.get(job.request_id)
                    if out is None:
                        continue
                    assert not out.error, out.error
                    job.output_token_ids.extend(out.token_ids)
                    job.logprobs.extend(out.logprobs)
                    if len(job.output_token_ids) >= job.max_tokens:
                        running.remove(job)
                        self.free_blocks.extend(reversed(job.block_ids))
                        finished_ids.append(job.request_id)
            step_id += 1
        self.num_steps = step_id
        return {j.request_id: j for j in jobs}

    def _schedule(self, step_id: int, running: list[Job], finished_ids: list[str]) -> tuple[StepInput, list[Job]]:
        budget = self.token_budget
        new, cached, scheduled = [], [], []
        self._num_scheduled: dict[str, int] = {}
        num_prefill = num_decode = 0
        for job in running:  # decodes first so prefills never starve them
            if job.num_tokens - job.num_computed_tokens != 1 or not job.sent:
                continue
            budget -= self._add(job, 1, new, cached, scheduled)
            num_decode += 1
        for job in running:
            remaining = job.num_tokens - job.num_computed_tokens
            if job.request_id in self._num_scheduled or remaining == 0 or budget == 0:
                continue
            n = min(remaining, budget)
            budget -= self._add(job, n, new, cached, scheduled)
            num_prefill += n
        self.batch_shapes.append((num_prefill, num_decode))
        return StepInput(step_id, tuple(new), tuple(cached), tuple(finished_ids)), scheduled

    def _add(self, job: Job, n: int, new: list, cached: list, scheduled: list) -> int:
        needed = -(-(job.num_computed_tokens + n) // self.block_size) - len(job.block_ids)
        new_blocks = [self.free_blocks.pop() for _ in range(max(0, needed))]
        job.block_ids.extend(new_blocks)
        if not job.sent:
            new.append(NewRequestData(job.request_id, tuple(job.prompt_token_ids), tuple(job.output_token_ids),
                                      job.sampling, tuple(job.block_ids), job.num_computed_tokens, n))
            job.sent = True
        else:
            cached.append(CachedRequestData(job.request_id, tuple(new_blocks), n, job.num_computed_tokens))
        self._num_scheduled[job.request_id] = n
        if job.num_computed_tokens < len(job.prompt_token_ids):
            job.num_prefill_steps += 1
        scheduled.append(job)
        return n
