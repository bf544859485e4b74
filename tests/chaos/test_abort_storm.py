"""Abort storm: 1,000 greedy requests through the public gRPC API, 64 at a time, 30% of them
cancelled at random moments (before the first token, during a long prompt's chunked prefill, after
k decoded tokens), on workers whose KV pools are small enough that the scheduler must preempt, with
a host KV tier under them (so evicted prefixes are copied down and hits copied up mid-storm).

Afterwards no KV block is in use on any worker in either tier (free + cached + used = total),
nothing is live in the scheduler or held by a worker, and every request that was not cancelled
streamed exactly the tokens of Hugging Face greedy decoding (cancelled ones streamed a prefix of them).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest
from switchyard.api.v1 import generation_pb2 as pb

from tests.chaos.conftest import (
    assert_reference_prefix,
    greedy_request,
    hf_reference,
    metric_total,
    prompt_ids,
    running_stack,
    scrape,
    stubs,
    wait_quiescent,
    wait_worker_requests_zero,
)

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

NUM_REQUESTS = 1000
CONCURRENCY = 64
CANCEL_FRACTION = 0.30
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 4, 32
# 63 usable blocks of 16 tokens per worker: the ~32 requests a worker runs at once need several
# times that, so the scheduler preempts; the longest request (~420 tokens) still fits alone.
NUM_BLOCKS = 64
HOST_CACHE_MIB = 8  # 128 blocks of the tiny model's 64 KiB: twice the device pool
# A small step budget splits the long prompts into several chunks: a cancel can land mid-prefill.
MAX_NUM_BATCHED_TOKENS = 128
LONG_PROMPT_TOKENS = 150
WORDS = ("the scheduler owns every block table and a worker is an executor that computes one step "
         "at a time while tokens stream back to the client who may cancel").split()
PROMPT_WORDS = (2, 4, 7, 10, 15, 20, 30, 40, 55, 70, 90, 120, 160, 220, 300, 400)  # 16 distinct prompts


def make_prompt(seed: int, num_words: int) -> str:
    rng = random.Random(seed)
    return f"prompt {seed}: " + " ".join(rng.choice(WORDS) for _ in range(num_words))


PROMPTS = [make_prompt(i, n) for i, n in enumerate(PROMPT_WORDS)]


@dataclass
class Plan:
    index: int
    prompt: int
    max_tokens: int
    cancel_after_s: float | None = None  # cancel on a timer (before first token / mid-prefill)
    cancel_after_tokens: int | None = None  # cancel once this many tokens arrived (mid-decode)


@dataclass
class Outcome:
    plan: Plan
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    finish_reason: int = 0
    error: str = ""


def make_plans(long_prompts: set[int]) -> list[Plan]:
    rng = random.Random(2024)
    plans = []
    for i in range(NUM_REQUESTS):
        plan = Plan(i, rng.randrange(len(PROMPTS)), rng.randint(MIN_MAX_TOKENS, MAX_MAX_TOKENS))
        if rng.random() < CANCEL_FRACTION:
            phases = ["queued", "decode"] + (["prefill", "prefill"] if plan.prompt in long_prompts else [])
            phase = rng.choice(phases)
            if phase == "queued":  # before the request can have been scheduled, or just after
                plan.cancel_after_s = rng.uniform(0.0, 0.005)
            elif phase == "prefill":  # a long prompt's chunks take several steps
                plan.cancel_after_s = rng.uniform(0.01, 0.25)
            else:
                plan.cancel_after_tokens = rng.randint(1, plan.max_tokens - 1)
        plans.append(plan)
    return plans


async def run_one(api, plan: Plan) -> Outcome:
    outcome = Outcome(plan)
    call = api.Generate(greedy_request(PROMPTS[plan.prompt], plan.max_tokens, request_id=f"storm-{plan.index}"),
                        timeout=180)
    timer = None
    if plan.cancel_after_s is not None:
        timer = asyncio.get_running_loop().call_later(plan.cancel_after_s, call.cancel)
    try:
        async for response in call:
            outcome.tokens.extend(response.token_ids)
            outcome.finish_reason = response.finish_reason
            if plan.cancel_after_tokens is not None and len(outcome.tokens) >= plan.cancel_after_tokens:
                call.cancel()  # whatever the server still sends is never read: cancelled for the client
                outcome.cancelled = True
                break
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling() or not call.cancelled():
            raise  # the test itself is being cancelled, not this call
        outcome.cancelled = True
    except grpc.aio.AioRpcError as e:
        outcome.error = f"{e.code().name}: {e.details()}"
    finally:
        if timer is not None:
            timer.cancel()
    return outcome


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("storm"), tiny_model_dir,
                       worker_args=("--num-blocks", str(NUM_BLOCKS), "--kv-host-cache-mib", str(HOST_CACHE_MIB),
                                    "--num-threads", "1"),
                       scheduler_args=("--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS))) as (_, running):
        yield running


async def test_abort_storm_leaks_no_block_and_keeps_greedy_parity(stack, tiny_model_dir) -> None:
    async with stubs(stack) as (api, scheduler):
        ids = [await prompt_ids(api, p) for p in PROMPTS]
        long_prompts = {i for i, p in enumerate(ids) if len(p) >= LONG_PROMPT_TOKENS}
        assert len(long_prompts) >= 3, [len(p) for p in ids]
        plans = make_plans(long_prompts)
        before = await scrape(stack.metrics_urls["scheduler"])

        gate = asyncio.Semaphore(CONCURRENCY)

        async def bounded(plan: Plan) -> Outcome:
            async with gate:
                return await run_one(api, plan)

        started = time.monotonic()
        outcomes = await asyncio.gather(*(bounded(p) for p in plans))
        storm_s = time.monotonic() - started

        stats = await wait_quiescent(scheduler)
        held = await wait_worker_requests_zero(stack)
        after = await scrape(stack.metrics_urls["scheduler"])

    errors = [f"{o.plan.index}: {o.error}" for o in outcomes if o.error]
    assert not errors, f"{len(errors)} requests failed: {errors[:10]}"

    # Nothing leaked: every worker up, no block in use, nothing live anywhere.
    blocks_leaked = sum(w.num_blocks_used for w in stats.workers)
    assert len(stats.workers) == 2 and all(w.up for w in stats.workers), stats
    for w in stats.workers:
        assert w.num_blocks_used + w.num_blocks_cached + w.num_blocks_free == w.num_blocks_total, w
        assert w.num_host_blocks_total > 0 and w.num_host_blocks_used == 0, w
        assert (w.num_host_blocks_used + w.num_host_blocks_cached + w.num_host_blocks_free
                == w.num_host_blocks_total), w
    assert blocks_leaked == 0, stats
    assert stats.num_live_requests == 0, stats
    assert not any(held.values()), f"workers still hold request state: {held}"

    preemptions = (metric_total(after, "switchyard_preemptions_total")
                   - metric_total(before, "switchyard_preemptions_total"))
    assert preemptions > 0, "the KV pool was meant to be small enough to force preemption"
    host_hits = (metric_total(after, "switchyard_prefix_cache_hits_total", tier="host")
                 - metric_total(before, "switchyard_prefix_cache_hits_total", tier="host"))
    assert host_hits > 0, "evicted prefixes were meant to come back from the host tier"

    cancelled = [o for o in outcomes if o.cancelled]
    completed = [o for o in outcomes if not o.cancelled]
    assert len(cancelled) >= 0.25 * NUM_REQUESTS, f"only {len(cancelled)} cancels landed"
    phases = Counter(
        "mid_decode" if o.tokens else ("before_first_token_long_prompt" if o.plan.prompt in long_prompts
                                       else "before_first_token")
        for o in cancelled)
    assert phases["mid_decode"] and phases["before_first_token"] and phases["before_first_token_long_prompt"], phases

    # Greedy parity: completed requests in full, cancelled ones as far as they got.
    references = {i: hf_reference(tiny_model_dir, ids[i], MAX_MAX_TOKENS) for i in range(len(PROMPTS))}
    tokens_compared = 0
    for o in completed:
        assert o.finish_reason == pb.FINISH_REASON_LENGTH and len(o.tokens) == o.plan.max_tokens, (
            f"request {o.plan.index}: {len(o.tokens)} of {o.plan.max_tokens} tokens, finish {o.finish_reason}")
        tokens_compared += assert_reference_prefix(references[o.plan.prompt], o.tokens, f"request {o.plan.index}")
    for o in cancelled:
        assert len(o.tokens) <= o.plan.max_tokens
        tokens_compared += assert_reference_prefix(references[o.plan.prompt], o.tokens,
                                                   f"cancelled request {o.plan.index}")

    print(f"FIGURES: abort storm: requests={NUM_REQUESTS} concurrency={CONCURRENCY} completed={len(completed)} "
          f"cancelled={len(cancelled)} (before_first_token={phases['before_first_token']}, "
          f"mid_prefill_long_prompt={phases['before_first_token_long_prompt']}, "
          f"mid_decode={phases['mid_decode']}) preemptions={preemptions:.0f} host_hit_tokens={host_hits:.0f} "
          f"blocks_leaked={blocks_leaked} "
          f"live_after={stats.num_live_requests} tokens_compared={tokens_compared} storm_s={storm_s:.1f}")
