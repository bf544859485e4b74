"""A DNS pool follows scale-up and scale-down: real workers and scheduler over gRPC on loopback,
with the DNS answers played by the test (in Kubernetes they come from a headless Service)."""

from __future__ import annotations

import asyncio

from switchyard.scheduler.v1 import scheduler_pb2_grpc

from services.scheduler.fleet import Fleet, FleetConfig
from services.scheduler.router import PoolConfig
from services.scheduler.leadership import Leadership
from services.scheduler.servicer import SchedulerServicer
from services.worker.executor import Executor
from services.worker.model_runner import ModelRunner
from services.worker.servicer import WorkerServicer
from shared.channel import insecure_channel
from shared.server import GrpcServer
from tests.inprocess import BLOCK_SIZE
from tests.scheduler.test_service import collect, greedy_request


async def serve(name: str, register) -> GrpcServer:
    server = GrpcServer(service_name=name, register=register, address="127.0.0.1:0", grace_s=0.5)
    await server.start()
    return server


async def wait_for(predicate, what: str, timeout_s: float = 20.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what}")


async def test_dns_pool_follows_scale_up_and_down(tiny_model_dir) -> None:
    workers = []
    for _ in range(2):
        servicer = WorkerServicer(Executor(ModelRunner(tiny_model_dir, num_blocks=256, block_size=BLOCK_SIZE)),
                                  version="v1")
        workers.append(await serve("worker", servicer.register))
    a, b = (f"127.0.0.1:{w.bound_port}" for w in workers)
    answers: list[set[str] | None] = [{a}]

    async def resolver(target):
        assert (target.host, target.port) == ("switchyard-worker-stable.switchyard.svc", 50061)
        return answers[-1]

    pool = PoolConfig("stable", "v1", 1.0, (), dns="switchyard-worker-stable.switchyard.svc:50061")
    fleet = Fleet(FleetConfig(pools=(pool,), probe_interval_s=0.1, discovery_interval_s=3600), resolver=resolver)
    servicer = SchedulerServicer(Leadership.leading(fleet))
    scheduler = await serve("scheduler", servicer.register)
    channel = insecure_channel(f"127.0.0.1:{scheduler.bound_port}")
    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    try:
        await fleet.start(wait_s=30)
        assert set(fleet.loops) == {a} and fleet.loops[a].up  # the first answer, before serving

        answers.append({a, b})  # scale up
        await fleet.discover()
        await wait_for(lambda: b in fleet.loops and fleet.loops[b].up, "discovered worker up")
        assert [p.worker_addresses for p in fleet.pool_views()] == [(a, b)]

        # A long request runs on `a` while the pod behind it is scaled away.
        long_run = asyncio.create_task(collect(stub, greedy_request("long", [21, 22, 23], 120)))
        await wait_for(lambda: "long" in fleet.live and fleet.live["long"].request.output_token_ids, "first token")
        on_a = fleet.live["long"].worker.address == a
        retired, kept = (a, b) if on_a else (b, a)
        answers.append({kept})  # scale down
        await fleet.discover()
        assert fleet.loops[retired].retiring and not fleet.loops[retired].up
        placed_on: set[str] = set()
        for i in range(4):  # new work goes to the worker that stays
            rid = f"new{i}"
            tokens, last, _ = await collect(stub, greedy_request(rid, [31 + i, 32, 33], 6),
                                            on_token=lambda n, rid=rid: rid in fleet.live and placed_on.add(fleet.live[rid].worker.address))
            assert len(tokens) == 6
        assert placed_on == {kept}
        assert not long_run.done()  # the retiring worker was still busy while the others were served
        tokens, last, _ = await long_run  # the retired worker finished what it was running
        assert len(tokens) == 120
        await wait_for(lambda: fleet.loops[retired].done, "retired loop ended")
        await fleet.discover()
        assert set(fleet.loops) == {kept}

        answers.append(None)  # a failed lookup keeps the workers we have
        await fleet.discover()
        assert set(fleet.loops) == {kept}
        answers.append(set())  # scaled to zero
        await fleet.discover()
        assert fleet.loops[kept].retiring
    finally:
        await channel.close()
        await scheduler.shutdown()
        await fleet.stop()
        for w in workers:
            await w.shutdown()
