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
from services.tokenizer.response_cache import CACHE_CONTROL_METADATA_KEY, CACHE_STATUS_KEY, CacheControl
from shared.auth import AUTHORIZATION_KEY, Gate
from shared.errors import Unavailable


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, frontend: Frontend, *, version: str = "", max_request_bytes: int = 1 << 20,
                 gate: Gate | None = None) -> None:
        self._frontend = frontend
        self._gate = gate or Gate()  # names the caller's key for the response cache
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
        tenant, control = "", CacheControl()
        if self._frontend.response_cache is not None:
            metadata = {key: str(value) for key, value in context.invocation_metadata() or ()}
            tenant = self._gate.key_name(metadata.get(AUTHORIZATION_KEY))  # the interceptor admitted it
            control = CacheControl.parse(metadata.get(CACHE_CONTROL_METADATA_KEY))
        self._num_live += 1
        self._idle.clear()
        try:
            generation = self._frontend.generate(inp, tenant=tenant, cache_control=control)
            first = True
            async with aclosing(metrics.observe_chunks("grpc", generation)) as chunks:
                async for chunk in chunks:
                    if first and chunk.cache is not None:
                        # Initial metadata, so a client knows a hit before it reads the first message.
                        await context.send_initial_metadata(((CACHE_STATUS_KEY, chunk.cache),))
                    first = False
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
