"""A thin gRPC shell for `switchyard.api.v1.Generation` over the Frontend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from switchyard.api.v1 import generation_pb2 as pb
from switchyard.api.v1 import generation_pb2_grpc

from services.tokenizer import metrics, wire
from services.tokenizer.frontend import Frontend
from shared.errors import Unavailable


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, frontend: Frontend, *, version: str = "", max_request_bytes: int = 1 << 20) -> None:
        self._frontend = frontend
        self._version = version
        self._max_request_bytes = max_request_bytes
        self._num_live = 0
        self._idle = asyncio.Event()  # set while no Generate stream is open; drain waits on it
        self._idle.set()
        self.draining = False

    def register(self, server: grpc.aio.Server) -> list[str]:
        generation_pb2_grpc.add_GenerationServicer_to_server(self, server)
        return [wire.GENERATION_SERVICE]

    @metrics.track_grpc
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        if self.draining:
            raise Unavailable("front door is draining")
        inp = wire.generate_input_from_pb(request, context.time_remaining(), self._max_request_bytes)
        self._num_live += 1
        self._idle.clear()
        try:
            async with aclosing(metrics.observe_chunks("grpc", self._frontend.generate(inp))) as chunks:
                async for chunk in chunks:
                    yield wire.chunk_to_pb(chunk)
        finally:
            self._num_live -= 1
            if not self._num_live:
                self._idle.set()

    async def drain(self) -> None:
        """Refuses new streams and waits for the open ones (the server's grace bounds the wait)."""
        self.draining = True
        await self._idle.wait()

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        prompt, messages, add_special_tokens = wire.tokenize_input_from_pb(request)
        ids = self._frontend.tokenize(prompt, messages, add_special_tokens=add_special_tokens)
        return wire.tokenize_response_to_pb(ids)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return wire.model_info_to_pb(self._frontend.model_name, self._frontend.max_model_len,
                                     self._frontend.vocab_size, self._version)
