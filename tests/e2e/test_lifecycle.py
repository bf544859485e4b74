"""Deadlines, liveness and graceful drain on the real stack (separate processes, as `make up` runs it).

The module's tests share one stack and run in order: the drain test comes last because it stops
every process, one at a time, each while a request is in flight through it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import grpc.aio
import httpx
import pytest
from switchyard.api.v1 import generation_pb2 as pb
from switchyard.api.v1 import generation_pb2_grpc
from switchyard.scheduler.v1 import scheduler_pb2 as sched_pb
from switchyard.scheduler.v1 import scheduler_pb2_grpc
from switchyard.worker.v1 import worker_pb2, worker_pb2_grpc

from deploy.stack import HEALTH_NAMES, check_health, is_alive, start_stack, stop_stack
from tests.deploy.test_stack import make_config

pytestmark = pytest.mark.e2e

LIVENESS_TIMEOUT_S = 2.0
GRACE_S = 20.0


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("run"), tiny_model_dir, services=("worker", "scheduler", "tokenizer"),
                         grace_s=GRACE_S, stop_grace_s=GRACE_S + 5,
                         scheduler_args=("--liveness-timeout-s", str(LIVENESS_TIMEOUT_S)))
    running = start_stack(config)
    try:
        yield running
    finally:
        stop_stack(config.run_dir, grace_s=5, quiet=True)


def request(prompt: str, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                         ignore_eos=True))


async def stats(address: str) -> sched_pb.SchedulerStats:
    async with grpc.aio.insecure_channel(address) as channel:
        return await scheduler_pb2_grpc.SchedulerStub(channel).GetStats(sched_pb.GetStatsRequest(), timeout=5)


def num_steps(stack) -> float:
    """Steps every worker has executed (the count of the step batch-size histogram)."""
    total = 0.0
    for name, url in stack.metrics_urls.items():
        if name.startswith("worker"):
            for line in httpx.get(url, timeout=5).text.splitlines():
                if line.startswith("switchyard_step_batch_size_count"):
                    total += float(line.rsplit(" ", 1)[1])
    return total


async def wait_for(predicate, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"{what} not within {timeout_s} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_deadline_aborts_everywhere_and_reaches_the_client(stack) -> None:
    async with grpc.aio.insecure_channel(stack.tokenizer_address) as channel:
        api = generation_pb2_grpc.GenerationStub(channel)
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for response in api.Generate(request("a long story", 1500), timeout=1.0):
                received += response.token_ids
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0 < len(received) < 1500  # it was generating when the deadline passed

    async def released() -> bool:
        s = await stats(stack.scheduler_address)
        return s.num_live_requests == 0 and all(w.num_blocks_used == 0 for w in s.workers)

    await wait_for(released, 3.0, "request released and its blocks freed")
    await asyncio.sleep(0.3)  # the step that tells the worker to forget it
    before = num_steps(stack)
    await asyncio.sleep(1.5)
    assert num_steps(stack) == before, "a step ran after the deadline with nothing else to do"


async def test_no_tokens_while_requests_run_turns_health_not_serving(stack) -> None:
    workers = [p for p in stack.processes if p.kind == "worker"]
    scheduler = stack.scheduler_address
    service = HEALTH_NAMES["scheduler"]
    async with grpc.aio.insecure_channel(stack.tokenizer_address) as channel:
        stream = generation_pb2_grpc.GenerationStub(channel).Generate(request("keep going", 300), timeout=120)
        tokens = list((await stream.read()).token_ids)
        for w in workers:
            os.kill(w.pid, signal.SIGSTOP)  # wedged: alive, connected, and producing nothing
        try:
            async def not_serving() -> bool:
                return await asyncio.to_thread(check_health, scheduler, service) == "NOT_SERVING"

            took_s = await wait_for(not_serving, LIVENESS_TIMEOUT_S + 3.0, "NOT_SERVING after tokens stopped")
            assert took_s >= LIVENESS_TIMEOUT_S - 0.5  # not before the configured time
        finally:
            for w in workers:
                os.kill(w.pid, signal.SIGCONT)

        async def serving() -> bool:
            return await asyncio.to_thread(check_health, scheduler, service) == "SERVING"

        await wait_for(serving, 5.0, "SERVING again once tokens flow")
        assert len(await _finish(stream, tokens)) == 300


async def _start(api, prompt: str, max_tokens: int):
    """A started stream that has produced its first tokens, and the tokens so far."""
    stream = api.Generate(request(prompt, max_tokens), timeout=120)
    return stream, list((await stream.read()).token_ids)


async def _finish(stream, tokens: list[int]) -> list[int]:
    """The rest of a stream read with `read()` (grpc.aio forbids mixing it with iteration)."""
    while (response := await stream.read()) is not grpc.aio.EOF:
        tokens = tokens + list(response.token_ids)
    return tokens


async def _gone(pid: int, timeout_s: float) -> float:
    async def exited() -> bool:
        return not is_alive(pid)

    return await wait_for(exited, timeout_s, f"pid {pid} exiting")


async def test_sigterm_drains_each_service_in_turn(stack) -> None:
    by_name = {p.name: p for p in stack.processes}
    prompts = [f"drain {i}: once upon a time" for i in range(4)]
    async with grpc.aio.insecure_channel(stack.tokenizer_address) as channel:
        api = generation_pb2_grpc.GenerationStub(channel)
        reference = [await _finish(*await _start(api, p, 200)) for p in prompts]

        # A worker: its running requests finish on it, its health says NOT_SERVING, it refuses to
        # be adopted again (Info), new requests go to the other worker, and then it exits.
        started = [await _start(api, p, 200) for p in prompts]
        s = await stats(stack.scheduler_address)
        busy = max(s.workers, key=lambda w: w.num_running_requests)
        assert busy.num_running_requests > 0
        worker = next(p for p in stack.processes if p.address == busy.address)
        os.kill(worker.pid, signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert await asyncio.to_thread(check_health, worker.address, HEALTH_NAMES["worker"]) == "NOT_SERVING"
        async with grpc.aio.insecure_channel(worker.address) as wchannel:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await worker_pb2_grpc.WorkerStub(wchannel).Info(worker_pb2.InfoRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        late = await _finish(*await _start(api, prompts[0], 20))
        assert late == reference[0][:20]  # served by the worker that stays
        assert [await _finish(*s) for s in started] == reference
        await _gone(worker.pid, GRACE_S)

        # The front door: the stream in flight finishes; new calls get UNAVAILABLE; it exits.
        tokenizer = by_name["tokenizer"]
        stream, tokens = await _start(api, prompts[1], 200)
        os.kill(tokenizer.pid, signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert await asyncio.to_thread(check_health, tokenizer.address, HEALTH_NAMES["tokenizer"]) == "NOT_SERVING"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _finish(*await _start(api, prompts[2], 5))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await _finish(stream, tokens) == reference[1]
        await _gone(tokenizer.pid, GRACE_S)

    # The scheduler, called directly: the same contract.
    scheduler = by_name["scheduler"]
    async with grpc.aio.insecure_channel(scheduler.address) as channel:
        direct = scheduler_pb2_grpc.SchedulerStub(channel)
        sampling = pb.SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        stream = direct.Generate(sched_pb.GenerateRequest(prompt_token_ids=[5, 6, 7, 8], sampling=sampling), timeout=120)
        tokens = list((await stream.read()).token_ids)
        os.kill(scheduler.pid, signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert await asyncio.to_thread(check_health, scheduler.address, HEALTH_NAMES["scheduler"]) == "NOT_SERVING"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _finish(direct.Generate(sched_pb.GenerateRequest(prompt_token_ids=[5], sampling=sampling), timeout=10), [])
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(await _finish(stream, tokens)) == 200
        await _gone(scheduler.pid, GRACE_S)

    # The last worker, idle, leaves at once; nothing of the stack is left running.
    for p in stack.processes:
        if is_alive(p.pid):
            print(f"stopping idle {p.name} (pid {p.pid})")  # shown when the wait below fails
            os.kill(p.pid, signal.SIGTERM)
            # Within 90% of the grace: an idle process that waited out its grace would still fail,
            # while interpreter teardown on a machine busy with the rest of the suite has room (a
            # fixed 5 s, then half the grace, each failed once on a loaded machine).
            await _gone(p.pid, GRACE_S * 0.9)
    assert not any(is_alive(p.pid) for p in stack.processes)
