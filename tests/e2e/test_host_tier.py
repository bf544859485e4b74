"""End to end: the host KV tier (L2) under a small device pool (L1), on the stack as separate processes.

One worker with 48 usable device blocks of 16 tokens and a host tier of 32 MiB (512 blocks of the
tiny model). Eight prompts of 300 tokens (19 blocks each, 152 in all: three times the device pool)
are each sent once, then each again: by the second visit the device pool has long evicted a
prompt's blocks, so whatever is cached came back from the host tier. Every second visit reports at
least 284 cached tokens (18 full blocks; the last token is always computed), its greedy tokens equal
the first visit's (computed from scratch, with no hit), and the hits are counted under tier="host".
Then an abort storm over the same prompts: afterwards nothing is in use in either tier.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest
from switchyard.api.v1 import generation_pb2 as pb

from deploy.stack import Stack, start_stack, stop_stack
from tests.chaos.conftest import metric_total, scrape, stubs, wait_quiescent
from tests.deploy.test_stack import make_config

pytestmark = pytest.mark.e2e

NUM_DEVICE_BLOCKS = 49  # 48 usable + the null block
HOST_CACHE_MIB = 32
NUM_PREFIXES, PREFIX_TOKENS, MAX_TOKENS = 8, 300, 12
VOCAB_SIZE = 4096  # the tiny model's


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory) -> Iterator[Stack]:
    config = make_config(
        tmp_path_factory.mktemp("host-tier"), tiny_model_dir, services=("worker", "scheduler", "tokenizer"),
        num_workers=1, timeout_s=120.0,
        worker_args=("--num-blocks", str(NUM_DEVICE_BLOCKS), "--kv-host-cache-mib", str(HOST_CACHE_MIB),
                     "--num-threads", "1"))
    running = start_stack(config)
    try:
        yield running
    finally:
        stop_stack(config.run_dir, grace_s=5.0, quiet=True)


def prompts() -> list[list[int]]:
    rng = random.Random(17)
    return [[rng.randrange(1, VOCAB_SIZE) for _ in range(PREFIX_TOKENS)] for _ in range(NUM_PREFIXES)]


def request(prompt_token_ids: list[int], max_tokens: int = MAX_TOKENS) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=prompt_token_ids),
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


async def generate(api, req: pb.GenerateRequest) -> tuple[list[int], pb.Usage]:
    tokens, usage = [], None
    async for response in api.Generate(req, timeout=120):
        tokens.extend(response.token_ids)
        if response.HasField("usage"):
            usage = response.usage
    assert usage is not None
    return tokens, usage


async def test_prefixes_evicted_from_the_device_come_back_from_the_host_tier(stack) -> None:
    async with stubs(stack) as (api, scheduler):
        before = await scrape(stack.metrics_urls["scheduler"])
        first = [await generate(api, request(p)) for p in prompts()]
        second = [await generate(api, request(p)) for p in prompts()]
        after = await scrape(stack.metrics_urls["scheduler"])
        stats = await wait_quiescent(scheduler)

    for i, ((tokens_1, usage_1), (tokens_2, usage_2)) in enumerate(zip(first, second)):
        assert usage_1.cached_tokens == 0, f"prefix {i}: first visit found a cache hit"
        assert usage_2.cached_tokens >= 284, f"prefix {i}: second visit cached only {usage_2.cached_tokens}"
        assert tokens_2 == tokens_1 and len(tokens_1) == MAX_TOKENS, f"prefix {i}: tokens differ after the copy up"

    def hits(tier: str) -> float:
        name = "switchyard_prefix_cache_hits_total"
        return metric_total(after, name, tier=tier) - metric_total(before, name, tier=tier)

    # 48 device blocks hold under three prompts: at least the first five revisits came from the host.
    assert hits("host") >= 5 * 18 * 16, (hits("host"), hits("device"))
    assert hits("host") + hits("device") == sum(u.cached_tokens for _, u in second)
    [worker] = stats.workers
    assert worker.num_blocks_total == NUM_DEVICE_BLOCKS - 1 and worker.num_host_blocks_total > 0
    assert worker.num_host_blocks_used == 0 and worker.num_host_blocks_cached >= NUM_PREFIXES * 18


async def test_an_abort_storm_leaves_nothing_held_in_either_tier(stack) -> None:
    rng = random.Random(5)
    cached = prompts()

    async def one(i: int) -> None:
        prompt = cached[i % NUM_PREFIXES] + [rng.randrange(1, VOCAB_SIZE) for _ in range(rng.randrange(0, 40))]
        call = api.Generate(request(prompt, max_tokens=rng.randrange(4, 24)), timeout=120)
        cancel_after_s = rng.choice((None, 0.0, 0.01, 0.05, 0.2))
        timer = None if cancel_after_s is None else asyncio.get_running_loop().call_later(cancel_after_s, call.cancel)
        try:
            async for _ in call:
                pass
        except asyncio.CancelledError:
            if not call.cancelled():
                raise
        finally:
            if timer is not None:
                timer.cancel()

    async with stubs(stack) as (api, scheduler):
        gate = asyncio.Semaphore(16)

        async def bounded(i: int) -> None:
            async with gate:
                await one(i)

        await asyncio.gather(*(bounded(i) for i in range(96)))
        stats = await wait_quiescent(scheduler, timeout_s=30.0)  # checks free + cached + used = total, both tiers

    [worker] = stats.workers
    assert stats.num_live_requests == 0 and worker.num_blocks_used == 0, stats
    assert worker.num_host_blocks_used == 0, stats
    assert worker.num_host_blocks_cached > 0, stats
