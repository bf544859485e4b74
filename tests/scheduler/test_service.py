"""The scheduler with two real workers, all over gRPC on loopback in one process."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest
from switchyard.api.v1 import generation_pb2 as api_pb
from switchyard.scheduler.v1 import scheduler_pb2 as pb

from tests.inprocess import BLOCK_SIZE, Stack
from tests.reference import assert_greedy_matches, hf_greedy


def greedy_request(request_id: str, prompt: list[int], max_tokens: int, **kw) -> pb.GenerateRequest:
    sampling = api_pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, sampling=sampling, **kw)


async def collect(stub, request: pb.GenerateRequest, on_token=None) -> tuple[list[int], pb.TokenEvent, float]:
    started = time.perf_counter()
    ttft = None
    tokens: list[int] = []
    last = None
    async for event in stub.Generate(request, timeout=120):
        if event.token_ids and ttft is None:
            ttft = time.perf_counter() - started
        tokens.extend(event.token_ids)
        last = event
        if on_token is not None:
            on_token(len(tokens))
    return tokens, last, ttft


def prompts(n: int, vocab: int, seed: int, lo: int = 1, hi: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


async def blocks_in_use(stub) -> int:
    stats = await stub.GetStats(pb.GetStatsRequest())
    for w in stats.workers:
        if w.up:
            assert w.num_blocks_used + w.num_blocks_cached + w.num_blocks_free == w.num_blocks_total
    return sum(w.num_blocks_used for w in stats.workers)


async def test_64_concurrent_greedy_requests_match_hf(tiny_model_dir) -> None:
    async with Stack(tiny_model_dir) as stack:
        batch = prompts(64, 4096, seed=1)
        results = await asyncio.gather(*(collect(stack.stub, greedy_request(f"c{i}", p, 12)) for i, p in enumerate(batch)))
        for i, (prompt, (tokens, last, _)) in enumerate(zip(batch, results)):
            assert last.finish_reason == api_pb.FINISH_REASON_LENGTH and len(tokens) == 12
            assert last.num_prompt_tokens == len(prompt)
            assert_greedy_matches(hf_greedy(tiny_model_dir, prompt, 12), tokens, f"request c{i}")
        stats = await stack.stub.GetStats(pb.GetStatsRequest())
        assert all(w.up for w in stats.workers) and stats.num_live_requests == 0
        assert all(loop.num_steps > 0 for loop in stack.fleet.loops.values()), "one worker got no traffic"
        assert await blocks_in_use(stack.stub) == 0


async def test_late_request_joins_running_batch(tiny_model_dir) -> None:
    async with Stack(tiny_model_dir) as stack:
        early = prompts(4, 4096, seed=2, lo=10, hi=30)
        started = asyncio.Event()
        early_tasks = [asyncio.create_task(collect(stack.stub, greedy_request(f"e{i}", p, 160),
                                                   on_token=lambda n: started.set() if n >= 5 else None))
                       for i, p in enumerate(early)]
        await started.wait()
        late_prompt = prompts(1, 4096, seed=3, lo=20, hi=20)[0]
        tokens, last, _ = await collect(stack.stub, greedy_request("late", late_prompt, 8))
        assert len(tokens) == 8 and last.finish_reason == api_pb.FINISH_REASON_LENGTH
        # The late request finished while every early one was still decoding: it joined the batch.
        assert not any(t.done() for t in early_tasks)
        await asyncio.gather(*early_tasks)


async def test_repeated_long_prompt_hits_prefix_cache(tiny_model_dir) -> None:
    async with Stack(tiny_model_dir, max_num_batched_tokens=2048) as stack:
        prompt = prompts(1, 4096, seed=4, lo=1500, hi=1500)[0]
        _, first, ttft_first = await collect(stack.stub, greedy_request("p1", prompt, 2))
        tokens, second, ttft_second = await collect(stack.stub, greedy_request("p2", prompt, 2))
        assert first.num_cached_tokens == 0
        assert second.num_cached_tokens >= len(prompt) - BLOCK_SIZE
        assert ttft_second < ttft_first
        salted, third, _ = await collect(stack.stub, greedy_request("p3", prompt, 2, cache_salt="tenant-b"))
        assert third.num_cached_tokens == 0 and salted == tokens
        assert await blocks_in_use(stack.stub) == 0


async def test_worker_death_mid_stream_loses_nothing(tiny_model_dir) -> None:
    async with Stack(tiny_model_dir) as stack:
        batch = prompts(16, 4096, seed=5, lo=5, hi=60)
        progress = {}
        enough = asyncio.Event()

        def track(i):
            def on_token(n):
                progress[i] = n
                if sum(1 for v in progress.values() if v >= 3) >= 12:
                    enough.set()
            return on_token

        tasks = [asyncio.create_task(collect(stack.stub, greedy_request(f"k{i}", p, 40), on_token=track(i)))
                 for i, p in enumerate(batch)]
        await enough.wait()
        victim = stack.fleet.live[next(iter(stack.fleet.live))].worker.address
        index = stack.addresses.index(victim)
        moved = [rid for rid, live in stack.fleet.live.items() if live.worker.address == victim]
        await stack.workers[index].shutdown()  # abrupt: the in-flight Step fails
        results = await asyncio.gather(*tasks)
        assert moved, "no request was on the killed worker"
        for i, (prompt, (tokens, last, _)) in enumerate(zip(batch, results)):
            assert len(tokens) == 40 and last.finish_reason == api_pb.FINISH_REASON_LENGTH
            assert_greedy_matches(hf_greedy(tiny_model_dir, prompt, 40), tokens, f"k{i}")
        stats = await stack.stub.GetStats(pb.GetStatsRequest())
        assert [w.up for w in stats.workers].count(False) == 1


async def test_cancel_and_abort_free_blocks(tiny_model_dir) -> None:
    async with Stack(tiny_model_dir) as stack:
        prompt = prompts(1, 4096, seed=6, lo=100, hi=100)[0]
        call = stack.stub.Generate(greedy_request("cancel-me", prompt, 500))
        async for event in call:
            if event.token_ids:
                break
        call.cancel()
        aborted = asyncio.create_task(collect(stack.stub, greedy_request("abort-me", prompt, 500)))
        while "abort-me" not in stack.fleet.live:
            await asyncio.sleep(0.01)
        assert (await stack.stub.Abort(pb.AbortRequest(request_id="abort-me"))).found
        tokens, last, _ = await aborted
        assert last.finish_reason == api_pb.FINISH_REASON_ABORT and len(tokens) < 500
        for _ in range(100):
            if await blocks_in_use(stack.stub) == 0 and not stack.fleet.live:
                break
            await asyncio.sleep(0.05)
        assert await blocks_in_use(stack.stub) == 0 and not stack.fleet.live


async def test_bad_requests_are_refused_with_the_field(tiny_model_dir) -> None:
    async with Stack(tiny_model_dir) as stack:
        cases = {
            "sampling.max_tokens": greedy_request("b1", [5, 6], 4000),
            "sampling.top_p": pb.GenerateRequest(request_id="b2", prompt_token_ids=[5],
                                                 sampling=api_pb.SamplingParams(top_p=1.5)),
            "prompt_token_ids": pb.GenerateRequest(request_id="b3", prompt_token_ids=[]),
        }
        for field_name, request in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stack.stub, request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field_name in err.value.details()
        assert not stack.fleet.live


async def test_deadline_aborts_and_frees_blocks(tiny_model_dir) -> None:
    async with Stack(tiny_model_dir) as stack:
        prompt = prompts(1, 4096, seed=7, lo=50, hi=50)[0]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stack.stub.Generate(greedy_request("late", prompt, 1900), timeout=0.5):
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        def settled() -> bool:  # the worker was told to drop it (finished ids sent), nothing left to do
            # A step planned before the abort may still be in flight; it is not "scheduled afterwards".
            loops = stack.fleet.loops.values()
            return not stack.fleet.live and not any(l.batcher.has_work() or l.num_steps_in_flight for l in loops)

        for _ in range(100):
            if settled():
                break
            await asyncio.sleep(0.05)
        assert settled() and await blocks_in_use(stack.stub) == 0
        steps_after = {a: l.num_steps for a, l in stack.fleet.loops.items()}
        await asyncio.sleep(0.3)
        assert {a: l.num_steps for a, l in stack.fleet.loops.items()} == steps_after  # nothing scheduled for it


async def test_full_waiting_queue_is_resource_exhausted_with_retry_hint(tiny_model_dir) -> None:
    async with Stack(tiny_model_dir, max_num_seqs=1, max_waiting_requests=2) as stack:
        async def run(i):
            return await collect(stack.stub, greedy_request(f"q{i}", [9 + i] * 10, 30))

        results = await asyncio.gather(*(run(i) for i in range(10)), return_exceptions=True)
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        served = [r for r in results if not isinstance(r, BaseException)]
        assert refused and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
        assert all(dict(r.trailing_metadata()).get("retry-after-ms") for r in refused)
        assert len(served) >= 4 and all(len(tokens) == 30 for tokens, _, _ in served)
        assert await blocks_in_use(stack.stub) == 0


def record_plans(stack: Stack) -> list:
    """Every non-empty plan the stack's single worker loop sends from now on, in order."""
    (loop,) = stack.fleet.loops.values()
    schedule = loop.batcher.schedule
    plans = []

    def recording(**kw):
        plan = schedule(**kw)
        if not plan.is_empty:
            plans.append(plan)
        return plan

    loop.batcher.schedule = recording
    return plans


@pytest.mark.parametrize(("batch_wait_ms", "same_step"), [(500.0, True), (0.0, False)])
async def test_batch_wait_puts_requests_a_few_ms_apart_in_one_first_step(tiny_model_dir, batch_wait_ms,
                                                                         same_step) -> None:
    async with Stack(tiny_model_dir, num_workers=1, batch_wait_ms=batch_wait_ms) as stack:
        plans = record_plans(stack)
        first_prompt, second_prompt = prompts(2, 4096, seed=8, lo=10, hi=30)
        first = asyncio.create_task(collect(stack.stub, greedy_request("first", first_prompt, 4)))
        while "first" not in stack.fleet.live:  # it reached the idle worker
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.005)
        second = asyncio.create_task(collect(stack.stub, greedy_request("second", second_prompt, 4)))
        results = await asyncio.gather(first, second)
        first_step = {rid: next(i for i, p in enumerate(plans) if rid in {n.request.request_id for n in p.new_requests})
                      for rid in ("first", "second")}
        assert (first_step["first"] == first_step["second"]) is same_step, first_step
        for prompt, (tokens, last, _) in zip((first_prompt, second_prompt), results):
            assert last.finish_reason == api_pb.FINISH_REASON_LENGTH
            assert_greedy_matches(hf_greedy(tiny_model_dir, prompt, 4), tokens, "batch wait")


async def test_batch_wait_never_delays_an_abort_a_deadline_or_a_full_step(tiny_model_dir) -> None:
    async with Stack(tiny_model_dir, num_workers=1, batch_wait_ms=5000.0, max_num_seqs=2) as stack:
        (loop,) = stack.fleet.loops.values()
        prompt = prompts(1, 4096, seed=9, lo=20, hi=20)[0]
        started = time.perf_counter()
        waiting = asyncio.create_task(collect(stack.stub, greedy_request("abort-me", prompt, 4)))
        while "abort-me" not in stack.fleet.live:
            await asyncio.sleep(0.001)
        assert (await stack.stub.Abort(pb.AbortRequest(request_id="abort-me"))).found
        tokens, last, _ = await waiting
        assert last.finish_reason == api_pb.FINISH_REASON_ABORT and tokens == []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stack.stub.Generate(greedy_request("late", prompt, 4), timeout=0.3):
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        while stack.fleet.live or loop.batcher.has_work():
            await asyncio.sleep(0.01)
        assert loop.num_steps == 0 and time.perf_counter() - started < 3.0  # both ended inside the wait
        # Two requests fill max_num_seqs: their step goes at once, not after 5 s.
        started = time.perf_counter()
        results = await asyncio.gather(*(collect(stack.stub, greedy_request(f"full{i}", p, 4))
                                         for i, p in enumerate(prompts(2, 4096, seed=10, lo=10, hi=30))))
        assert all(len(tokens) == 4 for tokens, _, _ in results)
        assert time.perf_counter() - started < 3.0
        assert await blocks_in_use(stack.stub) == 0
