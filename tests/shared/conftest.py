"""A probe service built from generic handlers over raw bytes, so shared/ is tested without protos.

Each request names what the handler should do; `ERRORS` maps those names to the exception raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable

import grpc
import grpc.aio
import pytest

from shared.channel import insecure_channel
from shared.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from shared.server import GrpcServer

SERVICE = "test.v1.Probe"

ERRORS: dict[bytes, Callable[[], Exception]] = {
    b"invalid": lambda: InvalidArgument("must be in (0, 1], got 1.5", field="sampling.top_p"),
    b"exhausted": lambda: ResourceExhausted("waiting queue is full (128 requests)", retry_after_s=0.25),
    b"unavailable": lambda: Unavailable("no worker of pool 'canary' is up"),
    b"deadline": lambda: DeadlineExceeded("deadline passed after 2.0 s in queue"),
    b"unauthenticated": lambda: Unauthenticated("missing API key"),
    b"not_found": lambda: NotFound("model 'gpt-9' is not served here", field="model"),
    b"failed_precondition": lambda: FailedPrecondition("worker has no model loaded"),
    b"bug": lambda: KeyError("secret-internal-detail"),
}


class Probe:
    """Handlers of every shape; the request bytes pick the failure, b"ok" succeeds."""

    def __init__(self) -> None:
        self.stream_closed = asyncio.Event()
        self.stream_cancelled = asyncio.Event()

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"abort":
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "request_id: already running")
        if request in ERRORS:
            raise ERRORS[request]()
        return request

    async def stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            yield b"0"
            yield b"1"
            if request == b"hang":
                await asyncio.Event().wait()
            if request in ERRORS:
                raise ERRORS[request]()
            yield b"2"
        except asyncio.CancelledError:
            self.stream_cancelled.set()
            raise
        finally:
            self.stream_closed.set()

    async def writer_stream(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        await context.write(b"0")
        if request in ERRORS:
            raise ERRORS[request]()
        await context.write(b"1")

    async def client_stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        received = [r async for r in requests]
        for r in received:
            if r in ERRORS:
                raise ERRORS[r]()
        return b"".join(received)

    async def bidi(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for r in requests:
            if r in ERRORS:
                raise ERRORS[r]()
            yield r

    def register(self, server: grpc.aio.Server) -> Iterable[str]:
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
            "WriterStream": grpc.unary_stream_rpc_method_handler(self.writer_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        return [SERVICE]


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def server(probe: Probe) -> AsyncIterator[GrpcServer]:
    async with GrpcServer(
        service_name="probe", register=probe.register, address="127.0.0.1:0", grace_s=0.5
    ) as running:
        yield running


@pytest.fixture
async def channel(server: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with insecure_channel(f"127.0.0.1:{server.bound_port}") as ch:
        yield ch


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"
