"""The response cache in a real in-process stack (front door, scheduler, a stable and a canary
worker pool, over gRPC), where its clock can be moved: TTL expiry, and canary safety across weight
changes announced on the real Connect stream. The flags, API keys and HTTP are covered by
tests/e2e/test_response_cache.py against separate processes."""

from __future__ import annotations

import asyncio

import pytest
from switchyard.api.v1 import generation_pb2 as pb
from switchyard.scheduler.v1 import scheduler_pb2 as sched_pb

from services.tokenizer.api_types import ServingPool
from services.tokenizer.response_cache import CACHE_STATUS_KEY, ResponseCache
from tests.inprocess import PoolSpec, Stack

pytestmark = pytest.mark.asyncio(loop_scope="session")

STABLE, CANARY = ServingPool("stable", "v1"), ServingPool("canary", "v2")
TTL_S = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
async def stack(tiny_model_dir):
    clock = Clock()
    cache = ResponseCache(8 << 20, TTL_S, clock=clock)
    pools = (PoolSpec("stable", "v1", 1.0, tiny_model_dir), PoolSpec("canary", "v2", 0.0, tiny_model_dir))
    async with Stack(tiny_model_dir, front_door=True, pools=pools, response_cache=cache) as running:
        running.clock = clock
        yield running


def greedy(prompt: str, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2, **sampling))


async def generate(stack, request: pb.GenerateRequest) -> tuple[str, list[pb.GenerateResponse]]:
    """The cache mark from the initial metadata, and the responses without their request ids."""
    call = stack.api.Generate(request, timeout=60)
    mark = dict(await call.initial_metadata()).get(CACHE_STATUS_KEY, "")
    responses = [r async for r in call]
    for r in responses:
        r.ClearField("request_id")
    return mark, responses


async def set_weights(stack, **weights: float) -> None:
    for pool, weight in weights.items():
        await stack.admin.SetPoolWeight(sched_pb.SetPoolWeightRequest(pool=pool, weight=weight))
    wanted = {ServingPool(p.name, p.version) for p in stack.fleet.router.pools() if p.weight > 0}
    for _ in range(200):  # the announcement travels down the Connect stream
        if stack.response_cache.routable == wanted:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the front door never heard that {wanted} are routable")


async def test_a_repeat_is_a_hit_until_the_ttl_passes(stack) -> None:
    request = greedy("The scheduler owns every block table.")
    mark, first = await generate(stack, request)
    assert mark == "miss" and first[-1].finish_reason == pb.FINISH_REASON_LENGTH
    stack.clock.now += TTL_S - 0.001
    mark, again = await generate(stack, request)
    assert mark == "hit" and again == first  # text, ids, logprobs, finish reason, usage, chunk by chunk
    stack.clock.now += 0.001
    mark, expired = await generate(stack, request)
    assert mark == "miss" and [r.token_ids for r in expired] and "".join(r.text for r in expired) == "".join(
        r.text for r in first)


async def test_a_rolled_back_canary_answer_is_never_served(stack) -> None:
    on_stable, on_canary = greedy("kept on stable"), greedy("answered by the canary")
    cache = stack.response_cache
    assert (await generate(stack, on_stable))[0] == "miss"
    assert cache.num_entries >= 1  # every answer so far is stable's
    try:
        await set_weights(stack, canary=1.0)  # a canary starts: stable's answers stay
        assert (await generate(stack, on_stable))[0] == "hit"
        await set_weights(stack, stable=0.0)  # every new request goes to the canary now
        assert cache.num_entries == 0  # stable is not routable: its answers are dropped
        assert (await generate(stack, on_canary))[0] == "miss"
        assert (await generate(stack, on_canary))[0] == "hit"
        await set_weights(stack, stable=1.0)
        assert (await generate(stack, on_canary))[0] == "hit"  # the canary is still routable
        await set_weights(stack, canary=0.0)  # rollback
        assert cache.routable == {STABLE} and cache.num_entries == 0  # the canary's answer is gone at once
        assert (await generate(stack, on_canary))[0] == "miss"  # recomputed by stable
        assert (await generate(stack, on_canary))[0] == "hit"  # stable's answer, stored just now
        assert (await generate(stack, on_stable))[0] == "miss"
        await set_weights(stack, canary=1.0)
        await set_weights(stack, canary=0.0)  # another canary comes and goes: stable's answers stay
        assert (await generate(stack, on_stable))[0] == "hit" and (await generate(stack, on_canary))[0] == "hit"
    finally:
        await set_weights(stack, stable=1.0, canary=0.0)
