"""The front door's Prometheus metrics: generation calls as the client sees them, by API.

The scheduler measures a request from its arrival there; only the front door sees what a client
waits for end to end (body parsing, tokenization, detokenization, stop strings) and how each call
ended on the wire. Both APIs report the same names with `api="grpc"|"http"`, and the HTTP status
is mapped to the gRPC status name, so one panel compares both doors.

Three small hooks feed it: a decorator on the gRPC `Generate` handler and an ASGI middleware on the
HTTP generation routes measure the whole call (status, latency, in flight); `observe_chunks` wraps
the Frontend's chunk stream for time to first token and finish reasons; a decorator on
`Frontend.tokenize` times tokenization. The response cache's lookups are counted by the Frontend,
its evictions by the hook the cache is built with, and its size is read when Prometheus scrapes.
Definitions are module level: registered once per process.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import grpc
from prometheus_client import Counter, Gauge, Histogram

from services.tokenizer.api_types import GenerateChunk
from services.tokenizer.response_cache import ResponseCache
from shared.errors import SwitchyardError
from shared.grpc_errors import status_code_for
from shared.telemetry import LATENCY_BUCKETS_S

# Tokenizing a prompt takes tens of microseconds to a few milliseconds: finer steps below 1 ms.
TOKENIZE_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, *LATENCY_BUCKETS_S)
# The HTTP routes that are generation calls; /health and /v1/models would only dilute the rates.
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
# HTTP status -> gRPC status name, the way the HTTP API maps typed errors to statuses in reverse.
_CODE_BY_HTTP_STATUS = {
    200: "OK", 400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED", 413: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}

REQUESTS = Counter(
    "switchyard_frontend_requests_total", "Generation calls by API and final gRPC status name.", ("api", "code"))
REQUEST_LATENCY = Histogram(
    "switchyard_frontend_request_latency_seconds", "Generation call from arrival to its last byte.",
    ("api",), buckets=LATENCY_BUCKETS_S)
TIME_TO_FIRST_TOKEN = Histogram(
    "switchyard_frontend_time_to_first_token_seconds",
    "Start of generation (tokenization included) to the first chunk with tokens.", ("api",),
    buckets=LATENCY_BUCKETS_S)
FINISH_REASONS = Counter(
    "switchyard_frontend_finish_reasons_total", "Generations by how they ended (stop, length, abort, error).",
    ("api", "finish_reason"))
TOKENIZE_DURATION = Histogram(
    "switchyard_frontend_tokenize_duration_seconds", "Rendering and encoding one input.", buckets=TOKENIZE_BUCKETS_S)
REQUESTS_IN_FLIGHT = Gauge("switchyard_frontend_requests_in_flight", "Generation calls being served.", ("api",))
RESPONSE_CACHE_HITS = Counter(
    "switchyard_frontend_response_cache_hits_total", "Deterministic requests answered from the response cache.")
RESPONSE_CACHE_MISSES = Counter(
    "switchyard_frontend_response_cache_misses_total",
    "Deterministic requests looked up in the response cache and not found (bypasses are neither).")
RESPONSE_CACHE_EVICTIONS = Counter(
    "switchyard_frontend_response_cache_evictions_total",
    "Response cache entries dropped: for room (capacity), past their TTL (expired), or because their pool "
    "stopped being routable (version).", ("reason",))
RESPONSE_CACHE_BYTES = Gauge(
    "switchyard_frontend_response_cache_bytes", "Memory the response cache's entries hold (estimated).")
RESPONSE_CACHE_CAPACITY_BYTES = Gauge(
    "switchyard_frontend_response_cache_capacity_bytes", "The response cache's budget (--response-cache-mib).")
RESPONSE_CACHE_ENTRIES = Gauge("switchyard_frontend_response_cache_entries", "Answers in the response cache.")

_F = TypeVar("_F", bound=Callable[..., Any])


class _Call:
    """One generation call: in flight from construction until `end`."""

    def __init__(self, api: str) -> None:
        self.api = api
        self.started_s = time.perf_counter()
        REQUESTS_IN_FLIGHT.labels(api).inc()

    def end(self, code: str) -> None:
        REQUESTS_IN_FLIGHT.labels(self.api).dec()
        REQUEST_LATENCY.labels(self.api).observe(time.perf_counter() - self.started_s)
        REQUESTS.labels(self.api, code).inc()


def grpc_code(error: BaseException) -> str:
    """The status a handler's exception becomes on the wire (the ErrorInterceptor's mapping)."""
    if isinstance(error, SwitchyardError):
        return status_code_for(type(error)).name
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"  # the client went away (or its deadline closed the call)
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code().name
    return "INTERNAL"


def track_grpc(handler: _F) -> _F:
    """Decorates a response-streaming gRPC handler method: status, latency and in-flight per call."""

    @functools.wraps(handler)
    async def tracked(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
        call = _Call("grpc")
        try:
            async with aclosing(handler(self, request, context)) as responses:
                async for response in responses:
                    yield response
        except BaseException as error:
            call.end(grpc_code(error))
            raise
        call.end("OK")

    return tracked  # type: ignore[return-value]


async def observe_chunks(api: str, chunks: AsyncIterator[GenerateChunk]) -> AsyncIterator[GenerateChunk]:
    """Passes the Frontend's chunks through, timing the first token and counting the finish reason.

    A stream that fails or is closed before its first chunk was refused (bad field, full queue) and
    counts only in the request counter; after that, an exception counts as `error` and an early
    close (the client went away) as `abort`.
    """
    started_s = time.perf_counter()
    first_token_seen = finished = False
    num_chunks = 0
    outcome = "abort"
    try:
        async with aclosing(chunks) as stream:
            async for chunk in stream:
                num_chunks += 1
                if chunk.token_ids and not first_token_seen:
                    first_token_seen = True
                    TIME_TO_FIRST_TOKEN.labels(api).observe(time.perf_counter() - started_s)
                if chunk.finish_reason is not None and not finished:
                    finished = True
                    FINISH_REASONS.labels(api, chunk.finish_reason).inc()
                yield chunk
    except Exception:
        outcome = "error"
        raise
    finally:
        if num_chunks and not finished:
            FINISH_REASONS.labels(api, outcome).inc()


def observe_cache_lookup(*, hit: bool) -> None:
    (RESPONSE_CACHE_HITS if hit else RESPONSE_CACHE_MISSES).inc()


def observe_cache_eviction(reason: str) -> None:
    """The response cache's eviction hook."""
    RESPONSE_CACHE_EVICTIONS.labels(reason).inc()


def observe_response_cache(cache: ResponseCache) -> None:
    """Size gauges read from the cache at scrape time, so they are never stale."""
    RESPONSE_CACHE_BYTES.set_function(lambda: float(cache.num_bytes))
    RESPONSE_CACHE_ENTRIES.set_function(lambda: float(cache.num_entries))
    RESPONSE_CACHE_CAPACITY_BYTES.set(cache.max_bytes)


def timed_tokenize(tokenize: _F) -> _F:
    """Decorates `Frontend.tokenize` to record its duration (failures too: they cost the same)."""

    @functools.wraps(tokenize)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started_s = time.perf_counter()
        try:
            return tokenize(*args, **kwargs)
        finally:
            TOKENIZE_DURATION.observe(time.perf_counter() - started_s)

    return timed  # type: ignore[return-value]


class HttpMetricsMiddleware:
    """ASGI middleware for the generation routes: status, latency (to the last byte of a stream)
    and in-flight per call.

    The code is the response's status: a stream that fails after its 200 has gone out is OK here
    and `error` in the finish reasons, which is what the client's HTTP library reports too.
    """

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        call = _Call("http")
        status = 500  # the app raised before starting a response

        async def send_and_note_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        cancelled = False
        try:
            await self.app(scope, receive, send_and_note_status)
        except asyncio.CancelledError:
            cancelled = True  # the server cut the call (shutdown); the client got no status
            raise
        finally:
            call.end("CANCELLED" if cancelled else _CODE_BY_HTTP_STATUS.get(status, "UNKNOWN"))


def instrument_http(app: Any) -> None:
    """Installs the middleware on a FastAPI/Starlette app before it serves its first request."""
    app.add_middleware(HttpMetricsMiddleware)
