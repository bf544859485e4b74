"""Fencing: a worker belongs to the scheduler whose Reset it saw last (the highest epoch), and refuses
every Step and Reset from an older one, so a stale scheduler that comes back can never drive a worker
another scheduler has taken over. Real gRPC servers on loopback: one tiny-model worker, and a second
Fleet started later against it while the first still runs."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from switchyard.scheduler.v1 import scheduler_pb2_grpc
from switchyard.worker.v1 import worker_pb2 as wpb
from switchyard.worker.v1 import worker_pb2_grpc

from services.scheduler.fleet import Fleet, FleetConfig
from services.scheduler.router import PoolConfig
from services.scheduler.leadership import Leadership
from services.scheduler.servicer import SchedulerServicer
from shared.channel import insecure_channel
from tests.inprocess import Stack
from tests.scheduler.test_service import collect, greedy_request

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_the_worker_refuses_steps_and_resets_from_an_older_epoch(tiny_model_dir) -> None:
    async with Stack(tiny_model_dir, num_workers=1, scheduler_epoch=100) as stack:
        async with insecure_channel(stack.addresses[0]) as channel:
            worker = worker_pb2_grpc.WorkerStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await worker.Step(wpb.StepRequest(step_id=10**6, scheduler_epoch=99))
            assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "scheduler_epoch" in refused.value.details() and "epoch 100" in refused.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await worker.Reset(wpb.ResetRequest(scheduler_epoch=99))
            assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            # The owner still drives it: a request through the scheduler of epoch 100 completes.
            tokens, last, _ = await collect(stack.stub, greedy_request("owner", [5, 6, 7, 8], 4))
            assert len(tokens) == 4


async def test_a_scheduler_started_later_takes_the_worker_over_and_the_stale_one_cannot_drive_it(
        tiny_model_dir) -> None:
    async with Stack(tiny_model_dir, num_workers=1, scheduler_epoch=1) as stale:
        tokens, _, _ = await collect(stale.stub, greedy_request("before", [5, 6, 7, 8], 4))
        assert len(tokens) == 4
        pool = PoolConfig("default", "v1", 1.0, tuple(stale.addresses))
        newer = Fleet(FleetConfig(pools=(pool,), max_num_batched_tokens=256, probe_interval_s=0.2,
                                  scheduler_epoch=2))
        await newer.start(wait_s=30)
        servicer = SchedulerServicer(Leadership.leading(newer))
        server = await stale._serve("scheduler-2", servicer.register, servicer.drain)
        try:
            async with insecure_channel(f"127.0.0.1:{server.bound_port}") as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                tokens, _, _ = await collect(stub, greedy_request("after", [9, 10, 11, 12], 4))
                assert len(tokens) == 4  # the new owner computes
            # The stale scheduler's next step is refused: it takes the worker down and cannot Reset
            # it back (its epoch is older), so its request never runs there.
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                async for event in stale.stub.Generate(greedy_request("stale", [5, 6, 7, 8], 4), timeout=10):
                    assert not event.token_ids, "the stale scheduler got a token out of a worker it no longer owns"
            assert failed.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            [loop] = stale.fleet.loops.values()
            deadline = time.monotonic() + 5
            while loop.up and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not loop.up
            await asyncio.sleep(1.0)  # several probe intervals: still refused, still down
            assert not loop.up and next(iter(newer.loops.values())).up
        finally:
            await newer.stop()
