"""Server bootstrap: health, reflection, binding, message limits and the shutdown order."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shared.channel import MAX_MESSAGE_BYTES, insecure_channel
from shared.server import BindError, GrpcServer, serve

from .conftest import SERVICE, Probe, method

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)).status


class _FakeTelemetry:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def shutdown(self) -> None:
        self.events.append("telemetry flushed")


async def test_health_serving_after_start(server: GrpcServer, channel: grpc.aio.Channel) -> None:
    assert server.service_names == (SERVICE,)
    assert await _health(channel, "") == SERVING
    assert await _health(channel, SERVICE) == SERVING


async def test_health_watch_sees_shutdown(probe: Probe) -> None:
    server = GrpcServer(service_name="probe", register=probe.register, address="127.0.0.1:0", grace_s=1)
    await server.start()
    async with insecure_channel(f"127.0.0.1:{server.bound_port}") as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        assert (await asyncio.wait_for(watch.read(), 2)).status == SERVING
        shutdown = asyncio.create_task(server.shutdown())
        assert (await asyncio.wait_for(watch.read(), 2)).status == NOT_SERVING
        watch.cancel()
        await asyncio.wait_for(shutdown, 2)


async def test_reflection_lists_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    response = await call.read()
    call.cancel()
    names = {s.name for s in response.list_services_response.service}
    assert names == {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


async def test_large_messages_fit(channel: grpc.aio.Channel) -> None:
    payload = b"x" * (8 * 1024 * 1024)  # twice gRPC's 4 MiB default
    assert MAX_MESSAGE_BYTES > len(payload)
    assert await channel.unary_unary(method("Unary"))(payload) == payload


async def test_taken_port_is_a_clear_error(server: GrpcServer, probe: Probe) -> None:
    address = f"127.0.0.1:{server.bound_port}"
    other = GrpcServer(service_name="second", register=probe.register, address=address, grace_s=0)
    with pytest.raises(BindError, match=rf"second cannot listen on {address}"):
        await other.start()
    with pytest.raises(RuntimeError, match="not started"):
        other.bound_port


async def test_shutdown_order(probe: Probe) -> None:
    events: list[str] = []
    drain_started = asyncio.Event()
    release_drain = asyncio.Event()

    async def on_drain() -> None:
        events.append("drain")
        drain_started.set()
        await release_drain.wait()

    server = GrpcServer(
        service_name="probe", register=probe.register, address="127.0.0.1:0", grace_s=5,
        on_drain=on_drain, telemetry=_FakeTelemetry(events),  # type: ignore[arg-type]
    )
    await server.start()
    async with insecure_channel(server.target) as ch:
        # The same entry point the SIGTERM handler uses.
        server.request_shutdown(signal.SIGTERM)
        assert server.shutting_down
        await asyncio.wait_for(drain_started.wait(), 2)
        # Draining: health says go away, yet in-flight and late calls are still answered.
        assert await _health(ch, "") == NOT_SERVING
        assert await _health(ch, SERVICE) == NOT_SERVING
        assert await ch.unary_unary(method("Unary"))(b"ok") == b"ok"
        release_drain.set()
        await asyncio.wait_for(server.wait_for_termination(), 2)
        assert events == ["drain", "telemetry flushed"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(method("Unary"))(b"ok", timeout=1)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    await server.shutdown()  # idempotent


async def test_grace_bounds_a_stuck_drain(probe: Probe) -> None:
    async def stuck() -> None:
        await asyncio.Event().wait()

    server = GrpcServer(
        service_name="probe", register=probe.register, address="127.0.0.1:0", grace_s=0.2, on_drain=stuck
    )
    await server.start()
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(server.shutdown(), 2)
    assert asyncio.get_running_loop().time() - started < 1.5


async def test_second_signal_stops_without_grace(probe: Probe) -> None:
    async def stuck() -> None:
        await asyncio.Event().wait()

    server = GrpcServer(
        service_name="probe", register=probe.register, address="127.0.0.1:0", grace_s=60, on_drain=stuck
    )
    await server.start()
    async with insecure_channel(f"127.0.0.1:{server.bound_port}") as ch:
        call = ch.unary_stream(method("Stream"))(b"hang")
        assert await call.read() == b"0"
        server.request_shutdown(signal.SIGTERM)
        await asyncio.sleep(0.05)
        assert server.shutting_down and not server.terminated
        server.request_shutdown(signal.SIGINT)
        await asyncio.wait_for(server.wait_for_termination(), 2)
        # The hanging stream was cut off instead of holding the process for a minute. The client
        # learns the status only after reading the messages already sent.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while await asyncio.wait_for(call.read(), 2) is not grpc.aio.EOF:
                pass
        assert info.value.code() is not grpc.StatusCode.OK
        assert probe.stream_cancelled.is_set()


async def test_grace_lets_inflight_stream_finish_then_cancels(probe: Probe) -> None:
    server = GrpcServer(service_name="probe", register=probe.register, address="127.0.0.1:0", grace_s=0.3)
    await server.start()
    async with insecure_channel(f"127.0.0.1:{server.bound_port}") as ch:
        call = ch.unary_stream(method("Stream"))(b"hang")
        assert await call.read() == b"0"
        await asyncio.wait_for(server.shutdown(), 2)
        await asyncio.wait_for(probe.stream_closed.wait(), 1)


async def test_serve_until_sigterm(probe: Probe) -> None:
    events: list[str] = []

    async def on_drain() -> None:
        events.append("drain")

    ready = asyncio.get_running_loop().create_future()
    original_handler = signal.getsignal(signal.SIGTERM)

    def register(server: grpc.aio.Server) -> list[str]:
        ready.set_result(None)
        return list(probe.register(server))

    task = asyncio.create_task(serve(
        service_name="probe", register=register, address="127.0.0.1:0", grace_s=1,
        on_drain=on_drain, telemetry=_FakeTelemetry(events),  # type: ignore[arg-type]
    ))
    await asyncio.wait_for(ready, 2)
    await asyncio.sleep(0.05)  # let serve() install its signal handlers
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 3)
    assert events == ["drain", "telemetry flushed"]
    # serve() removed its handler again, so a later SIGTERM behaves as before.
    assert signal.getsignal(signal.SIGTERM) == original_handler


async def test_cancelling_serve_still_shuts_down(probe: Probe) -> None:
    events: list[str] = []
    ready = asyncio.Event()

    def register(server: grpc.aio.Server) -> list[str]:
        ready.set()
        return list(probe.register(server))

    task = asyncio.create_task(serve(
        service_name="probe", register=register, address="127.0.0.1:0", grace_s=0,
        telemetry=_FakeTelemetry(events),  # type: ignore[arg-type]
    ))
    await asyncio.wait_for(ready.wait(), 2)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events == ["telemetry flushed"]


async def test_liveness_check_flips_health_both_ways(probe: Probe) -> None:
    live = [True]
    async with GrpcServer(service_name="probe", register=probe.register, address="127.0.0.1:0", grace_s=0.2,
                          liveness=lambda: live[0], liveness_period_s=0.05) as server:
        async with insecure_channel(server.target) as channel:
            assert await _health(channel, SERVICE) == SERVING
            live[0] = False
            await asyncio.sleep(0.3)
            assert await _health(channel, "") == NOT_SERVING
            assert await _health(channel, SERVICE) == NOT_SERVING
            live[0] = True
            await asyncio.sleep(0.3)
            assert await _health(channel, SERVICE) == SERVING
            await server.shutdown()
            live[0] = False  # a stopped server's health is not touched by the watchdog any more
