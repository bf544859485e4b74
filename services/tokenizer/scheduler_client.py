"""The front door's side of the scheduler stream.

Closing the async iterator early (a stop string, a client that went away) cancels the gRPC call,
which the scheduler turns into an abort that frees the request's KV blocks at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from opentelemetry import context as otel_context
from switchyard.scheduler.v1 import scheduler_pb2 as sched_pb
from switchyard.scheduler.v1 import scheduler_pb2_grpc

from services.tokenizer import wire
from services.tokenizer.api_types import GenerateInput, SchedulerEvent
from shared.channel import open_channel
from shared.errors import error_from_rpc
from shared.tls import TlsConfig


class SchedulerClient:
    def __init__(self, address: str, tls: TlsConfig | None = None) -> None:
        self.address = address
        self._channel = open_channel(address, tls)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    async def stream(self, request_id: str, prompt_token_ids: list[int], inp: GenerateInput,
                     trace_context: otel_context.Context | None = None) -> AsyncIterator[SchedulerEvent]:
        # The call captures the current trace context when it is created; attaching the caller's
        # span only around creation keeps the context stack balanced across this generator's yields.
        token = otel_context.attach(trace_context) if trace_context is not None else None
        try:
            call = self._stub.Generate(wire.scheduler_request_to_pb(request_id, prompt_token_ids, inp),
                                       timeout=inp.timeout_s)
        finally:
            if token is not None:
                otel_context.detach(token)
        try:
            async for msg in call:
                event = wire.scheduler_event_from_pb(msg)
                if event.finish_reason is not None:
                    # Read the stream to its status before handing over the last event: the caller
                    # stops reading after it, and a call left open is a cancelled call whose
                    # client span never ends.
                    async for _ in call:
                        pass
                yield event
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from e
        finally:
            call.cancel()  # no-op once the call has ended; aborts it otherwise

    async def close(self) -> None:
        await self._channel.close()

    async def get_stats(self) -> sched_pb.SchedulerStats:
        return await self._stub.GetStats(sched_pb.GetStatsRequest(), timeout=5)
