"""The front door's side of the scheduler stream.

Closing the async iterator early (a stop string, a client that went away) cancels the gRPC call,
which the scheduler turns into an abort that frees the request's KV blocks at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from switchyard.scheduler.v1 import scheduler_pb2 as sched_pb
from switchyard.scheduler.v1 import scheduler_pb2_grpc

from services.tokenizer import wire
from services.tokenizer.api_types import GenerateInput, SchedulerEvent
from shared.channel import insecure_channel
from shared.errors import error_from_rpc


class SchedulerClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = insecure_channel(address)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    async def stream(self, request_id: str, prompt_token_ids: list[int], inp: GenerateInput) -> AsyncIterator[SchedulerEvent]:
        call = self._stub.Generate(wire.scheduler_request_to_pb(request_id, prompt_token_ids, inp), timeout=inp.timeout_s)
        try:
            async for msg in call:
                yield wire.scheduler_event_from_pb(msg)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from e
        finally:
            call.cancel()  # no-op once the call has ended; aborts it otherwise

    async def close(self) -> None:
        await self._channel.close()

    async def get_stats(self) -> sched_pb.SchedulerStats:
        return await self._stub.GetStats(sched_pb.GetStatsRequest(), timeout=5)
