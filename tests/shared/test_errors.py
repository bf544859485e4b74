"""Typed errors reach the client as the right status, over every call shape, through a real server."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import grpc
import grpc.aio
import pytest

from shared.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, SwitchyardError, Unauthenticated
from shared.grpc_errors import FIELD_KEY, error_from_rpc, status_code_for
from shared.channel import insecure_channel
from shared.server import GrpcServer

from .conftest import ERRORS, SERVICE, Probe, method

EXPECTED: dict[bytes, tuple[grpc.StatusCode, str]] = {
    b"invalid": (grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: must be in (0, 1], got 1.5"),
    b"exhausted": (grpc.StatusCode.RESOURCE_EXHAUSTED, "waiting queue is full (128 requests)"),
    b"unavailable": (grpc.StatusCode.UNAVAILABLE, "no worker of pool 'canary' is up"),
    b"deadline": (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed after 2.0 s in queue"),
    b"unauthenticated": (grpc.StatusCode.UNAUTHENTICATED, "missing API key"),
    b"not_found": (grpc.StatusCode.NOT_FOUND, "model 'gpt-9' is not served here"),
    b"failed_precondition": (grpc.StatusCode.FAILED_PRECONDITION, "worker has no model loaded"),
}
TYPED = sorted(EXPECTED)
INTERNAL_MESSAGE = re.compile(r"^internal error \(error id [0-9a-f]{8}(, trace id [0-9a-f]{32})?\)$")


def test_invalid_argument_message_names_the_field() -> None:
    assert str(InvalidArgument("must be >= 1, got 0", field="sampling.max_tokens")) == (
        "sampling.max_tokens: must be >= 1, got 0"
    )
    # Already prefixed messages are kept as written.
    assert InvalidArgument("prompt: empty", field="prompt").message == "prompt: empty"
    with pytest.raises(ValueError):
        InvalidArgument("bad", field="")


def test_subclass_inherits_code_and_bare_base_is_internal() -> None:
    class QueueFull(ResourceExhausted):
        pass

    assert status_code_for(QueueFull) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code_for(SwitchyardError) is grpc.StatusCode.INTERNAL
    with pytest.raises(ValueError):
        ResourceExhausted("x", retry_after_s=-1)


@pytest.mark.parametrize("kind", TYPED)
async def test_unary_typed_errors(channel: grpc.aio.Channel, kind: bytes) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(method("Unary"))(kind)
    assert (info.value.code(), info.value.details()) == EXPECTED[kind]


@pytest.mark.parametrize("name", ["Stream", "WriterStream"])
@pytest.mark.parametrize("kind", TYPED)
async def test_stream_error_after_messages(channel: grpc.aio.Channel, name: str, kind: bytes) -> None:
    call = channel.unary_stream(method(name))(kind)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for message in call:
            received.append(message)
    assert received == [b"0", b"1"] if name == "Stream" else [b"0"]
    assert (info.value.code(), info.value.details()) == EXPECTED[kind]


async def test_client_and_bidi_streams(channel: grpc.aio.Channel) -> None:
    assert await channel.stream_unary(method("ClientStream"))(iter([b"a", b"b"])) == b"ab"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.stream_unary(method("ClientStream"))(iter([b"a", b"invalid"]))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    call = channel.stream_stream(method("Bidi"))(iter([b"a", b"unavailable"]))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for message in call:
            received.append(message)
    assert received == [b"a"]
    assert (info.value.code(), info.value.details()) == EXPECTED[b"unavailable"]


@pytest.mark.parametrize("name", ["Unary", "Stream"])
async def test_unexpected_exception_is_internal_with_error_id(
    channel: grpc.aio.Channel, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="shared.errors")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if name == "Unary":
            await channel.unary_unary(method(name))(b"bug")
        else:
            async for _ in channel.unary_stream(method(name))(b"bug"):
                pass
    assert info.value.code() is grpc.StatusCode.INTERNAL
    details = info.value.details()
    assert INTERNAL_MESSAGE.match(details), details
    assert "secret-internal-detail" not in details and "Traceback" not in details
    error_id = re.search(r"error id ([0-9a-f]{8})", details).group(1)
    [record] = [r for r in caplog.records if error_id in r.getMessage()]
    assert record.exc_info is not None and isinstance(record.exc_info[1], KeyError)


async def test_retry_after_trailing_metadata(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(method("Unary"))(b"exhausted")
    assert dict(info.value.trailing_metadata())["retry-after-ms"] == "250"


async def test_grpc_retry_policies_wait_the_hint(server: GrpcServer) -> None:
    """A client whose service config retries RESOURCE_EXHAUSTED waits our hint between attempts
    (grpc-retry-pushback-ms), not its own 10 ms backoff. A lower bound only: a busy machine is slower."""
    policy = {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.01s", "backoffMultiplier": 1,
              "retryableStatusCodes": ["RESOURCE_EXHAUSTED"]}
    config = json.dumps({"methodConfig": [{"name": [{"service": SERVICE}], "retryPolicy": policy}]})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}", options=[
            ("grpc.enable_retries", 1), ("grpc.service_config", config)]) as retrying:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await retrying.unary_unary(method("Unary"))(b"exhausted", timeout=30)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started >= 2 * 0.25  # two waits of the 250 ms hint


async def test_abort_passes_through(channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(method("Unary"))(b"abort")
    assert info.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert info.value.details() == "request_id: already running"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_client_cancel_reaches_the_handler(
    channel: grpc.aio.Channel, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    call = channel.unary_stream(method("Stream"))(b"hang")
    assert await call.read() == b"0"
    assert await call.read() == b"1"
    call.cancel()
    await asyncio.wait_for(probe.stream_cancelled.wait(), 2)
    await asyncio.wait_for(probe.stream_closed.wait(), 2)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("kind", TYPED)
async def test_error_from_rpc_round_trip(channel: grpc.aio.Channel, kind: bytes) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(method("Unary"))(kind)
    error = error_from_rpc(info.value)
    original = ERRORS[kind]()
    assert type(error) is type(original)
    assert (error.message, error.field) == (original.message, original.field)
    if isinstance(original, ResourceExhausted):
        assert error.retry_after_s == pytest.approx(original.retry_after_s)


async def test_error_from_rpc_untyped_code(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(method("Missing"))(b"ok")
    error = error_from_rpc(info.value)
    assert type(error) is SwitchyardError and error.message.startswith("UNIMPLEMENTED")


class _RequireApiKey(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        if ("x-api-key", "secret") not in (handler_call_details.invocation_metadata or ()):
            raise Unauthenticated("x-api-key: missing or wrong")
        return await continuation(handler_call_details)


async def test_interceptor_may_refuse_with_typed_error(probe: Probe) -> None:
    async with GrpcServer(
        service_name="probe", register=probe.register, address="127.0.0.1:0", grace_s=0,
        interceptors=[_RequireApiKey()],
    ) as server, insecure_channel(f"127.0.0.1:{server.bound_port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(method("Unary"))(b"ok")
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert info.value.details() == "x-api-key: missing or wrong"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in ch.unary_stream(method("Stream"))(b"ok"):
                pass
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.stream_unary(method("ClientStream"))(iter([b"a", b"b"]))
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert await ch.unary_unary(method("Unary"))(b"ok", metadata=(("x-api-key", "secret"),)) == b"ok"


def test_failed_precondition_has_no_field_by_default() -> None:
    assert FailedPrecondition("x").field is None


@pytest.mark.parametrize("payload", [b"\x0a\x03\xed\xa0\x80", b"\x0a\x05ab", b"\xff\xff\xff"])
async def test_a_message_that_does_not_parse_is_invalid_argument_not_unknown(payload: bytes) -> None:
    """Invalid UTF-8 in a string field (an encoded lone surrogate), a truncated field, garbage."""
    from grpc_health.v1 import health_pb2  # noqa: PLC0415 - any generated message will do

    async def echo(request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> bytes:
        return request.service.encode()

    def register(server: grpc.aio.Server) -> list[str]:
        handler = grpc.unary_unary_rpc_method_handler(
            echo, request_deserializer=health_pb2.HealthCheckRequest.FromString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.v1.Parse", {"Echo": handler}),))
        return ["test.v1.Parse"]

    async with GrpcServer(service_name="parse", register=register, address="127.0.0.1:0", grace_s=0.2) as server:
        async with insecure_channel(server.target) as channel:
            call = channel.unary_unary("/test.v1.Parse/Echo")
            assert await call(b"\x0a\x02ok", timeout=5) == b"ok"
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(payload, timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert dict(e.value.trailing_metadata())[FIELD_KEY] == "request"
