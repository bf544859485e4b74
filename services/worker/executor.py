"""The worker's pure core: keeps per-request state between steps and executes one batch.

The scheduler sends a request in full once and then only deltas, so the worker keeps each
request's tokens, block table and computed count. Every step is checked against that state
before any tensor is touched: a step that names an unknown request, a block outside the pool, or
tokens the worker does not have is refused whole (`InvalidArgument`), so a confused scheduler can
never write into another request's blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from services.worker.grammar import GrammarError, Grammars, advance, token_masks
from services.worker.kernels import build_metadata
from services.worker.model_runner import ModelRunner
from services.worker.sampler import Sampler, SamplingParams, SamplingRow
from services.worker.speculation import accepted, draft_rows
from services.worker.step import RequestResult, StepInput, StepResult, TokenLogprobs
from shared.errors import InvalidArgument
from shared.hf_tokenizer import load_tokenizer


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    num_scheduled_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # prompt + output, kept for slicing
    trace_context: str = ""
    # Its last sampling failed. The scheduler ends it when that reply arrives, but with async
    # scheduling a step planned before then may still schedule it: such a step skips it.
    failed: bool = False
    # This step's guessed tokens after the last one (speculative decoding); never kept past the step.
    draft_token_ids: tuple[int, ...] = ()
    # Constrained decoding (grammar.py): the matcher, or why it could not be built (the request then
    # fails at its first sampling, alone).
    matcher: Any = None
    grammar_error: str = ""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class Executor:
    """Applies a `StepInput` to the request states and runs it through the model."""

    def __init__(self, runner: ModelRunner, sampler: Sampler | None = None) -> None:
        self.runner = runner
        self.sampler = sampler or Sampler(runner.device)
        self.requests: dict[str, RequestState] = {}
        spec = runner.spec
        self.grammars = Grammars(lambda: load_tokenizer(runner.model_dir), spec.vocab_size, spec.eos_token_ids)

    def reset(self) -> int:
        num_dropped = len(self.requests)
        self.requests.clear()
        return num_dropped

    def execute(self, step: StepInput) -> StepResult:
        started = time.perf_counter()
        scheduled = self._apply(step)
        num_prefill = sum(
            max(0, min(s.num_computed_tokens + s.num_scheduled_tokens, len(s.prompt_token_ids)) - s.num_computed_tokens)
            for s in scheduled
        )
        num_tokens = sum(s.num_scheduled_tokens for s in scheduled)
        outputs = self._run(scheduled) if scheduled else ()
        return StepResult(step.step_id, tuple(outputs), time.perf_counter() - started,
                          len(scheduled), num_prefill, num_tokens - num_prefill)

    def trace_contexts(self, step: StepInput) -> list[tuple[str, str]]:
        """(request_id, traceparent) of every request a step schedules, for the step span's links."""
        found = [(r.request_id, r.trace_context) for r in step.new_requests]
        for cached in step.cached_requests:
            state = self.requests.get(cached.request_id)
            if state is not None:
                found.append((cached.request_id, state.trace_context))
        return [(rid, ctx) for rid, ctx in found if ctx]

    def _apply(self, step: StepInput) -> list[RequestState]:
        """Validates the whole step first, then mutates state, so a refused step changes nothing."""
        vocab_size = self.runner.spec.vocab_size
        staged: dict[str, RequestState] = {}
        remaining = {rid: s for rid, s in self.requests.items() if rid not in set(step.finished_request_ids)}
        for new in step.new_requests:
            field_name = f"new_requests[{new.request_id}]"
            if new.request_id in remaining or new.request_id in staged:
                raise InvalidArgument(f"{field_name}.request_id: already held by this worker", field=field_name)
            tokens = list(new.prompt_token_ids) + list(new.output_token_ids)
            if not new.prompt_token_ids:
                raise InvalidArgument(f"{field_name}.prompt_token_ids: empty", field=field_name)
            if any(t < 0 or t >= vocab_size for t in tokens):
                raise InvalidArgument(f"{field_name}.prompt_token_ids: ids must be in [0, {vocab_size})", field=field_name)
            state = staged[new.request_id] = RequestState(
                new.request_id, list(new.prompt_token_ids), list(new.output_token_ids), new.sampling,
                list(new.block_ids), new.num_computed_tokens, new.num_scheduled_tokens, tokens,
                new.trace_context,
            )
            if new.grammar:
                try:
                    state.matcher = self.grammars.matcher(new.grammar, new.output_token_ids)
                except GrammarError as e:
                    state.grammar_error = str(e)
        for cached in step.cached_requests:
            field_name = f"cached_requests[{cached.request_id}]"
            old = remaining.get(cached.request_id)
            if old is None:
                raise InvalidArgument(f"{field_name}.request_id: not held by this worker", field=field_name)
            if old.failed:
                continue
            if cached.num_computed_tokens is not None and cached.num_computed_tokens != old.num_computed_tokens:
                raise InvalidArgument(
                    f"{field_name}.num_computed_tokens: scheduler says {cached.num_computed_tokens}, "
                    f"worker has {old.num_computed_tokens}", field=field_name)
            drafts = tuple(cached.draft_token_ids)
            if drafts and old.matcher is not None:
                raise InvalidArgument(f"{field_name}.draft_token_ids: a constrained request takes no drafts",
                                      field=field_name)
            if drafts and (any(t < 0 or t >= vocab_size for t in drafts)
                           or old.num_computed_tokens + cached.num_scheduled_tokens != old.num_tokens + len(drafts)):
                # Drafts are verified against logits after the request's last token, so a step with
                # drafts must compute exactly that token and all of them.
                raise InvalidArgument(
                    f"{field_name}.draft_token_ids: {len(drafts)} drafts need ids in [0, {vocab_size}) and "
                    f"num_scheduled_tokens {old.num_tokens + len(drafts) - old.num_computed_tokens}, "
                    f"got {cached.num_scheduled_tokens}", field=field_name)
            # A new state (committed only once the whole step is valid) that keeps everything else.
            staged[cached.request_id] = replace(
                old, block_ids=old.block_ids + list(cached.new_block_ids),
                num_scheduled_tokens=cached.num_scheduled_tokens, draft_token_ids=drafts,
            )
        for state in staged.values():
            self._check_schedulable(state)
        kv_pool = self.runner.kv_pool
        try:
            kv_pool.check_copies(step.copies_to_host, step.copies_to_device)
        except ValueError as e:
            raise InvalidArgument(str(e), field=str(e).partition(":")[0]) from e
        for rid in step.finished_request_ids:
            self.requests.pop(rid, None)
        self.requests.update(staged)
        # Evicted blocks go down before this step can hand them to new owners (cleared or written),
        # host hits come up after the clearing and before the forward pass reads them.
        kv_pool.copy_to_host(step.copies_to_host)
        kv_pool.clear_blocks(self._fresh_blocks(step))
        kv_pool.copy_to_device(step.copies_to_device)
        return [s for s in staged.values() if s.num_scheduled_tokens > 0]

    def _fresh_blocks(self, step: StepInput) -> list[int]:
        """Blocks this step hands to a request for the first time: a new request's blocks past its
        prefix-cache hit (hits are whole blocks), and a running request's new blocks. They may hold
        a former owner's K/V, NaN included, in the slots this request has not written yet."""
        block_size = self.runner.block_size
        fresh = [b for new in step.new_requests for b in new.block_ids[-(-new.num_computed_tokens // block_size):]]
        fresh += [b for cached in step.cached_requests for b in cached.new_block_ids]
        return fresh

    def _check_schedulable(self, state: RequestState) -> None:
        field_name = f"requests[{state.request_id}]"
        end = state.num_computed_tokens + state.num_scheduled_tokens
        if state.num_scheduled_tokens < 0 or state.num_computed_tokens < 0:
            raise InvalidArgument(f"{field_name}.num_scheduled_tokens: negative counts", field=field_name)
        if end > state.num_tokens + len(state.draft_token_ids):
            raise InvalidArgument(
                f"{field_name}.num_scheduled_tokens: would compute up to token {end} "
                f"but the request has {state.num_tokens}", field=field_name)
        if end > self.runner.spec.max_model_len:
            raise InvalidArgument(f"{field_name}: exceeds max_model_len {self.runner.spec.max_model_len}", field=field_name)
        if len(state.block_ids) * self.runner.block_size < end:
            raise InvalidArgument(
                f"{field_name}.block_ids: {len(state.block_ids)} blocks cannot hold {end} tokens", field=field_name)
        if not all(self.runner.kv_pool.is_valid_block(b) for b in state.block_ids):
            raise InvalidArgument(
                f"{field_name}.block_ids: ids must be in [1, {self.runner.num_blocks})", field=field_name)

    def _run(self, scheduled: list[RequestState]) -> list[RequestResult]:
        input_ids: list[int] = []
        positions: list[int] = []
        logits_rows: list[int] = []
        sampling_reqs: list[RequestState] = []
        for state in scheduled:
            start, end = state.num_computed_tokens, state.num_computed_tokens + state.num_scheduled_tokens
            drafts = state.draft_token_ids
            input_ids.extend((state.token_ids + list(drafts) if drafts else state.token_ids)[start:end])
            positions.extend(range(start, end))
            if end == state.num_tokens + len(drafts):  # the prompt (or last sampled token) is complete: sample
                # With drafts: one row after the last token and one after each draft (speculation.py).
                logits_rows.extend(range(len(input_ids) - 1 - len(drafts), len(input_ids)))
                sampling_reqs.append(state)
        device = self.runner.device
        meta = build_metadata(
            [s.num_scheduled_tokens for s in scheduled],
            [s.num_computed_tokens + s.num_scheduled_tokens for s in scheduled],
            [s.block_ids for s in scheduled],
            self.runner.block_size,
            device,
        )
        logits = self.runner.forward(
            torch.tensor(input_ids, dtype=torch.int64, device=device),
            torch.tensor(positions, dtype=torch.int64, device=device),
            meta,
            torch.tensor(logits_rows, dtype=torch.int64, device=device),
        )
        for state in scheduled:
            state.num_computed_tokens += state.num_scheduled_tokens
            state.num_scheduled_tokens = 0
        if not sampling_reqs:
            return []
        masks = self._grammar_masks(sampling_reqs)
        rows = [r for s in sampling_reqs
                for r in draft_rows(SamplingRow(s.sampling, s.prompt_token_ids, s.output_token_ids,
                                                masks.get(s.request_id)), s.draft_token_ids)]
        sampled_rows = self.sampler.sample(logits, rows)
        results = []
        offset = 0
        for state in sampling_reqs:
            drafts = state.draft_token_ids
            samples = sampled_rows[offset:offset + len(drafts) + 1]
            offset += len(drafts) + 1
            kept = accepted(samples, drafts)
            error = state.grammar_error or ("" if kept else samples[0].error)
            if not error and state.matcher is not None:
                try:
                    advance(state.matcher, kept[0].token_id)
                except GrammarError as e:
                    error = str(e)
            if error:
                state.failed = True
                results.append(RequestResult(state.request_id, (), (), error))
                continue
            if drafts:
                self._settle_drafts(state, len(kept))
            token_ids = tuple(t.token_id for t in kept)
            state.output_token_ids.extend(token_ids)
            state.token_ids.extend(token_ids)
            logprobs = tuple(TokenLogprobs(t.logprob, t.top_token_ids, t.top_logprobs)
                             for t in kept if t.logprob is not None)
            results.append(RequestResult(state.request_id, token_ids, logprobs))
        return results

    def _grammar_masks(self, states: list[RequestState]) -> dict[str, torch.Tensor]:
        """Allowed-token masks of the constrained requests about to sample (none: {})."""
        constrained = [s for s in states if s.matcher is not None]  # None also where it could not be built
        if not constrained:
            return {}
        masks = token_masks([s.matcher for s in constrained], self.runner.spec.vocab_size)
        return {s.request_id: masks[i] for i, s in enumerate(constrained)}

    def _settle_drafts(self, state: RequestState, num_kept: int) -> None:
        """After a step with drafts, the K/V that counts is up to the last kept token's input
        (its own K/V is written by the next step); rejected drafts' slots are rewritten then. The
        blocks past it leave the table: the scheduler frees them by the same rule (cdiv of the
        computed count), so the two tables stay equal."""
        state.num_computed_tokens = state.num_tokens - 1 + num_kept
        del state.block_ids[-(-state.num_computed_tokens // self.runner.block_size):]
        state.draft_token_ids = ()
