"""The scheduler's servicers while it stands by, and as it stops leading: a standby refuses work
with UNAVAILABLE naming the leader, says so in GetStats and in health; a leader that steps down
ends every stream UNAVAILABLE at once, so front doors resume elsewhere. Real servers on loopback."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchyard.scheduler.v1 import scheduler_pb2 as pb

from services.scheduler import wire
from services.scheduler.leadership import Role
from services.scheduler.router import PoolConfig
from tests.scheduler.test_service import greedy_request
from tests.schedulers import ELSEWHERE, fleet_maker, hold_lease, leased, serve_worker, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
async def worker(tiny_model_dir):
    server = await serve_worker(tiny_model_dir)
    yield server.target
    await server.shutdown()


@pytest.fixture
async def standby(tmp_path):
    hold_lease(tmp_path / "lease", ELSEWHERE)
    scheduler = await leased(tmp_path / "lease")
    await wait_for(lambda: scheduler.leadership.leader == ELSEWHERE, "the standby read the lease")
    yield scheduler
    await scheduler.close()


async def health(scheduler, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(scheduler.channel).Check(health_pb2.HealthCheckRequest(service=service))
    return reply.status


def assert_refused_naming_the_leader(error: grpc.aio.AioRpcError, leader: str = ELSEWHERE) -> None:
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "standby" in error.details() and leader in error.details(), error.details()


async def test_a_standby_refuses_connect_naming_the_leader(standby) -> None:
    call = standby.stub.Connect()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        # The refusal does not wait for a submission: it may already have ended the call.
        await call.write(pb.ConnectRequest(submissions=[greedy_request("c1", [5, 6, 7], 4)]))
        async for _ in call:
            pytest.fail("a standby answered on its Connect stream")
    assert_refused_naming_the_leader(refused.value)


async def test_a_standby_refuses_generate_and_admin_naming_the_leader(standby) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in standby.stub.Generate(greedy_request("g1", [5, 6, 7], 4), timeout=5):
            pytest.fail("a standby streamed tokens")
    assert_refused_naming_the_leader(refused.value)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await standby.admin.ListPools(pb.ListPoolsRequest(), timeout=5)
    assert_refused_naming_the_leader(refused.value)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await standby.admin.SetPoolWeight(pb.SetPoolWeightRequest(pool="default", weight=0), timeout=5)
    assert_refused_naming_the_leader(refused.value)
    # Abort is answered (there is nothing here to abort), not refused: a front door may send it anywhere.
    assert not (await standby.stub.Abort(pb.AbortRequest(request_id="g1"))).found


async def test_a_standby_reports_its_role_without_an_epoch(standby) -> None:
    stats = await standby.stub.GetStats(pb.GetStatsRequest(), timeout=5)
    assert stats.role == pb.SCHEDULER_ROLE_STANDBY
    assert stats.scheduler_epoch == 0 and stats.leader == ELSEWHERE
    assert list(stats.workers) == [] and stats.num_live_requests == 0


async def test_a_standby_is_live_but_not_ready(standby) -> None:
    assert await health(standby, "") == SERVING  # liveness: do not restart it
    assert await health(standby, wire.SCHEDULER_SERVICE) == NOT_SERVING  # readiness: send it nothing
    assert await health(standby, wire.ADMIN_SERVICE) == NOT_SERVING
    await standby.server.set_ready(True)
    assert await health(standby, wire.SCHEDULER_SERVICE) == SERVING
    assert await health(standby, wire.ADMIN_SERVICE) == SERVING
    await standby.server.set_ready(False)
    assert await health(standby, wire.SCHEDULER_SERVICE) == NOT_SERVING
    assert await health(standby, "") == SERVING


async def first_tokens(stream) -> list[int]:
    async for event in stream:
        if event.token_ids:
            return list(event.token_ids)
    raise AssertionError("the stream ended before its first token")


async def connect_tokens(call):
    async for msg in call:
        for event in msg.events:
            if event.token_ids:
                yield event


async def test_a_leader_that_steps_down_ends_every_stream_unavailable(tmp_path, worker) -> None:
    pool = PoolConfig("default", "v1", 1.0, (worker,))
    scheduler = await leased(tmp_path / "lease", fleet_maker(pool), duration_s=3.0)  # no renewal in the way
    try:
        await wait_for(lambda: scheduler.leadership.fleet is not None, "it leads")
        assert await health(scheduler, wire.SCHEDULER_SERVICE) == SERVING
        stats = await scheduler.stub.GetStats(pb.GetStatsRequest())
        assert stats.role == pb.SCHEDULER_ROLE_LEADER and stats.scheduler_epoch == scheduler.leadership.epoch > 0
        assert stats.leader == scheduler.address

        generate = scheduler.stub.Generate(greedy_request("gen", [5, 6, 7, 8], 1500), timeout=30)
        connect = scheduler.stub.Connect()
        await connect.write(pb.ConnectRequest(submissions=[greedy_request("con", [9, 10, 11], 1500)]))
        connect_events = connect_tokens(connect)
        assert await first_tokens(generate) and await first_tokens(connect_events)
        fleet = scheduler.leadership.fleet
        assert set(fleet.live) == {"gen", "con"}

        scheduler.leadership.superseded("a worker refused our epoch")  # what a fenced worker loop says
        for name, stream in (("Connect", connect_events), ("Generate", generate)):
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                try:
                    async with asyncio.timeout(3):
                        async for _ in stream:
                            pass
                except TimeoutError:
                    pytest.fail(f"the {name} stream went on after its scheduler stopped leading")
            assert ended.value.code() is grpc.StatusCode.UNAVAILABLE, ended.value.details()
        assert fleet.live == {}
        assert scheduler.leadership.role is Role.STANDBY
        stats = await scheduler.stub.GetStats(pb.GetStatsRequest())
        assert stats.role == pb.SCHEDULER_ROLE_STANDBY and stats.scheduler_epoch == 0
        assert await health(scheduler, wire.SCHEDULER_SERVICE) == NOT_SERVING
        assert await health(scheduler, "") == SERVING
    finally:
        await scheduler.close()


async def test_a_draining_leased_leader_refuses_new_submissions_for_resubmission(tmp_path, worker) -> None:
    pool = PoolConfig("default", "v1", 1.0, (worker,))
    scheduler = await leased(tmp_path / "lease", fleet_maker(pool), duration_s=3.0)
    try:
        await wait_for(lambda: scheduler.leadership.fleet is not None, "it leads")
        connect = scheduler.stub.Connect()
        await connect.write(pb.ConnectRequest(submissions=[greedy_request("running", [5, 6, 7], 1500)]))
        events = connect_tokens(connect)
        assert await first_tokens(events)
        draining = asyncio.create_task(scheduler.servicer.drain())  # waits for "running" to end
        await connect.write(pb.ConnectRequest(submissions=[greedy_request("late", [9, 10], 4)]))
        refusal = None
        async for msg in connect:
            refusal = next((e for e in msg.events if e.request_id == "late"), None)
            if refusal is not None:
                break
        assert refusal.error_code == grpc.StatusCode.UNAVAILABLE.value[0] and "draining" in refusal.error_message
        assert refusal.resubmit  # a standby is about to lead: the front door may go there at once
        assert not draining.done() and "running" in scheduler.leadership.fleet.live  # it runs on
        await connect.write(pb.ConnectRequest(abort_request_ids=["running"]))
        await asyncio.wait_for(draining, 5)
        connect.cancel()
    finally:
        await scheduler.close()
