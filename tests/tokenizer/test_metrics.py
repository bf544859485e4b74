"""The front door's metric hooks: call status for both APIs, finish reasons and first-token time.

Counters are process-global and other tests serve calls too, so every check is a difference
measured around the call under test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import REGISTRY

from services.tokenizer import metrics
from services.tokenizer.api_types import GenerateChunk
from shared.errors import InvalidArgument, Unavailable


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def delta(name: str, **labels: str) -> Callable[[], float]:
    before = value(name, **labels)
    return lambda: value(name, **labels) - before


def chunk(token_ids: tuple[int, ...] = (1,), finish: str | None = None) -> GenerateChunk:
    return GenerateChunk("r", "x", token_ids, (), finish)


async def chunks(*items: GenerateChunk | Exception) -> AsyncIterator[GenerateChunk]:
    for item in items:
        if isinstance(item, Exception):
            raise item
        yield item


async def drain(stream: AsyncIterator[GenerateChunk], limit: int | None = None) -> None:
    async for _ in stream:
        if limit is not None:
            limit -= 1
            if limit == 0:
                await stream.aclose()  # type: ignore[attr-defined]
                return


@pytest.mark.parametrize("items, limit, reason", [
    ((chunk(()), chunk(), chunk(finish="length")), None, "length"),
    ((chunk(), chunk(finish="stop")), None, "stop"),
    ((chunk(), Unavailable("worker died")), None, "error"),
    ((chunk(), chunk(), chunk(finish="length")), 1, "abort"),  # the client went away
])
async def test_finish_reason_and_first_token(items, limit, reason) -> None:
    finished = delta("switchyard_frontend_finish_reasons_total", api="t", finish_reason=reason)
    first_tokens = delta("switchyard_frontend_time_to_first_token_seconds_count", api="t")
    try:
        await drain(metrics.observe_chunks("t", chunks(*items)), limit)
    except Unavailable:
        pass
    assert finished() == 1 and first_tokens() == 1


async def test_refused_before_any_chunk_is_no_finish() -> None:
    any_finish = [delta("switchyard_frontend_finish_reasons_total", api="t", finish_reason=r)
                  for r in ("stop", "length", "abort", "error")]
    with pytest.raises(InvalidArgument):
        await drain(metrics.observe_chunks("t", chunks(InvalidArgument("bad", field="prompt"))))
    assert [d() for d in any_finish] == [0, 0, 0, 0]


class _Handler:
    def __init__(self, *items: object) -> None:
        self.items = items

    @metrics.track_grpc
    async def Generate(self, request, context):
        for item in self.items:
            if isinstance(item, Exception):
                raise item
            yield item


@pytest.mark.parametrize("items, limit, code", [
    ((1, 2), None, "OK"),
    ((InvalidArgument("must be >= 0", field="sampling.temperature"),), None, "INVALID_ARGUMENT"),
    ((1, RuntimeError("bug")), None, "INTERNAL"),
    ((1, 2, 3), 1, "CANCELLED"),
])
async def test_grpc_call_status(items, limit, code) -> None:
    calls = delta("switchyard_frontend_requests_total", api="grpc", code=code)
    latencies = delta("switchyard_frontend_request_latency_seconds_count", api="grpc")
    in_flight = value("switchyard_frontend_requests_in_flight", api="grpc")
    try:
        await drain(_Handler(*items).Generate(None, None), limit)
    except (InvalidArgument, RuntimeError):
        pass
    assert calls() == 1 and latencies() == 1
    assert value("switchyard_frontend_requests_in_flight", api="grpc") == in_flight


async def test_http_status_maps_to_grpc_names_on_generation_routes_only() -> None:
    app = FastAPI()
    metrics.instrument_http(app)
    statuses = iter([200, 400, 429, 499])

    @app.post("/v1/completions")
    async def completions() -> Response:
        return JSONResponse({}, status_code=next(statuses))

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({})

    codes = ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "CANCELLED")
    counted = {code: delta("switchyard_frontend_requests_total", api="http", code=code) for code in codes}
    latencies = delta("switchyard_frontend_request_latency_seconds_count", api="http")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for _ in codes:
            await client.post("/v1/completions", json={})
        assert (await client.get("/health")).status_code == 200
    assert {code: d() for code, d in counted.items()} == dict.fromkeys(codes, 1)
    assert latencies() == 4
    assert value("switchyard_frontend_requests_in_flight", api="http") == 0


def test_tokenize_is_timed_even_when_it_fails() -> None:
    timed = delta("switchyard_frontend_tokenize_duration_seconds_count")

    @metrics.timed_tokenize
    def tokenize(text: str) -> list[int]:
        if not text:
            raise ValueError("empty")
        return [1, 2]

    assert tokenize("ab") == [1, 2]
    with pytest.raises(ValueError):
        tokenize("")
    assert timed() == 2
