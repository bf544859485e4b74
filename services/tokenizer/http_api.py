"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health.

A thin shell over `Frontend`, like the gRPC servicer: bodies become `GenerateInput`
(openai_schema.py), typed errors become OpenAI error bodies with the matching status, and chunks
become OpenAI responses or SSE events. A streaming response is only started once the first chunk
is there, so a bad field or a full queue still gets its status code rather than a 200 with an error
event; an error after that is sent as a last `data: {"error": ...}` event before `[DONE]`. A client
that goes away, before or during the stream, closes the frontend's iterator, which cancels the
scheduler stream and frees the request's KV blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Send

from services.tokenizer import metrics
from services.tokenizer.frontend import Frontend, GenerateChunk
from services.tokenizer.response_cache import CACHE_STATUS_KEY, CacheControl
from services.tokenizer.tool_calls import AutoScanner, CallDelta, CallScanner, Event, ToolUse, message_parts
from services.tokenizer.openai_schema import (
    ChatCompletionRequest, CompletionLogprobs, CompletionRequest, Endpoint, HttpError, chat_logprobs, choice,
    describe_error, envelope, error_body, param_from_loc, usage_json,
)
from shared.auth import Gate
from shared.errors import NotFound, SwitchyardError, Unauthenticated, Unavailable
from shared.tls import TlsConfig

logger = logging.getLogger(__name__)

# After refusing an oversize body, read (and drop) at most this much of it, so the client sees the
# 413 instead of a connection reset while it is still sending.
_MAX_DRAIN_BYTES = 64 << 20
_DONE = b"data: [DONE]\n\n"
# After the grace, how long a stream that produces no chunk (still queued, say) has before uvicorn
# cancels it outright.
_CUT_MARGIN_S = 1.0
_T = TypeVar("_T")


class _ClientGone(Exception):
    """The client disconnected before a response was started."""


def error_response(exc: BaseException, param_of: Callable[[str], str] | None = None) -> JSONResponse:
    status, body, headers = describe_error(exc, param_of)
    return JSONResponse(body, status_code=status, headers=headers)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _close(stream: AsyncIterator[Any]) -> None:
    """Closes the frontend's iterator even inside a cancelled scope (that is when it matters most)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its iterator, also when the client went away.

    Starlette cancels the sending task on disconnect; if that lands while the iterator is parked at
    a `yield`, nothing would close it until garbage collection, and the request would keep running.
    """

    media_type = "text/event-stream"

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await _close(self.body_iterator)  # type: ignore[arg-type]


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[_T]) -> _T:
    """Awaits `work`, cancelling it if the client disconnects first (Starlette does not, before a
    response starts)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watch):
            t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        raise _ClientGone()
    return task.result()


async def _read_json(request: Request, max_bytes: int) -> Any:
    declared = request.headers.get("content-length", "")
    size = declared if declared.isdigit() else f"more than {max_bytes}"
    too_big = HttpError(413, f"request body is {size} bytes, over the limit of {max_bytes} bytes",
                        code="request_too_large")
    if declared.isdigit() and int(declared) > max_bytes:
        await _drain(request)
        raise too_big
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            await _drain(request)
            raise too_big
    try:
        return json.loads(body)
    # ValueError covers JSONDecodeError, UnicodeDecodeError and integers of more digits than Python
    # converts; RecursionError is JSON nested deeper than the parser's stack.
    except (ValueError, RecursionError) as e:
        raise HttpError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None


async def _drain(request: Request) -> None:
    num_bytes = 0
    with contextlib.suppress(Exception):
        async for part in request.stream():
            num_bytes += len(part)
            if num_bytes > _MAX_DRAIN_BYTES:
                return


class _Generation:
    """One completion or chat request, from body to response."""

    def __init__(self, endpoint: Endpoint, frontend: Frontend, request: Request, max_request_bytes: int,
                 gate: Gate) -> None:
        self.endpoint = endpoint
        self.frontend = frontend
        self.request = request
        self.max_request_bytes = max_request_bytes
        self.gate = gate
        self.param_of: Callable[[str], str] | None = None
        self.logprobs = False
        self.n = 1  # sequences asked for; chunks carry their index
        self.tool_use: ToolUse | None = None  # chat with tools: the output is read for calls
        base = request.headers.get("x-request-id") or uuid.uuid4().hex
        self.response_id = f"{'cmpl' if endpoint == 'completions' else 'chatcmpl'}-{base}"
        self.created = int(time.time())

    async def respond(self) -> Response:
        try:
            if not self.request.app.state.ready:
                raise Unavailable("the server is not ready or is draining")
            body = await _read_json(self.request, self.max_request_bytes)
            model = CompletionRequest if self.endpoint == "completions" else ChatCompletionRequest
            req = model.model_validate(body)
            self.param_of = req.http_param
            if isinstance(req, ChatCompletionRequest):
                self.tool_use = req.tool_use()
            inp = req.to_input(self.response_id, self.frontend.model_name)
            self.logprobs = inp.sampling.logprobs is not None
            self.n = inp.sampling.n or 1
            tenant, control = "", CacheControl()
            if self.frontend.response_cache is not None:
                tenant = self.gate.key_name(self.request.headers.get("authorization"))  # the gate admitted it
                control = CacheControl.parse(self.request.headers.get("cache-control"))
            stream = metrics.observe_chunks(
                "http", self.frontend.generate(inp, tenant=tenant, cache_control=control))
            if not req.stream:
                chunks = await _unless_disconnected(self.request, self._collect(stream))
                return JSONResponse(self._whole(chunks), headers=_cache_header(chunks[0] if chunks else None))
            first = await _unless_disconnected(self.request, self._first(stream))
            return _SSEResponse(self._events(first, stream, req.include_usage),
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                         **_cache_header(first)})
        except (_ClientGone, ClientDisconnect):
            logger.debug("%s: client went away before the response started", self.response_id)
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body
            return error_response(e, self.param_of)

    async def _first(self, stream: AsyncIterator[GenerateChunk]) -> GenerateChunk:
        try:
            return await anext(stream)
        except BaseException:
            await _close(stream)
            raise

    async def _collect(self, stream: AsyncIterator[GenerateChunk]) -> list[GenerateChunk]:
        try:
            return [chunk async for chunk in stream]
        finally:
            await _close(stream)

    def _envelope(self, *, stream: bool, choices: list[dict[str, Any]], usage: dict[str, Any] | None,
                  with_usage: bool) -> dict[str, Any]:
        return envelope(self.endpoint, response_id=self.response_id, created=self.created,
                        model=self.frontend.model_name, stream=stream, choices=choices, usage=usage,
                        with_usage=with_usage)

    def _logprobs(self, renderer: CompletionLogprobs, chunks: list[GenerateChunk]) -> Any:
        if not self.logprobs:
            return None
        token_ids = tuple(t for c in chunks for t in c.token_ids)
        logprobs = tuple(lp for c in chunks for lp in c.logprobs)
        if self.endpoint == "completions":
            return renderer.render(token_ids, logprobs)
        return chat_logprobs(self.frontend.token_text, token_ids, logprobs)

    def _whole(self, chunks: list[GenerateChunk]) -> dict[str, Any]:
        if not chunks:
            raise RuntimeError("the frontend ended the stream without a chunk")
        choices = []
        for index in range(self.n):
            mine = [c for c in chunks if c.index == index]
            if not mine:
                raise RuntimeError(f"the frontend ended the stream without a chunk of sequence {index}")
            logprobs = self._logprobs(CompletionLogprobs(self.frontend.token_text), mine)
            text: str | None = "".join(c.text for c in mine)
            finish_reason, calls = mine[-1].finish_reason, None
            if self.tool_use is not None:
                scanner = self.tool_use.scanner()
                text, calls = message_parts(scanner.feed(text or "") + scanner.finish())
                finish_reason = _tool_finish(finish_reason, len(calls))
            choices.append(choice(self.endpoint, text=text, logprobs=logprobs, finish_reason=finish_reason,
                                  stream=False, index=index, tool_calls=calls))
        # Usage is on the last chunk of all: with n > 1, the prompt once and every sequence's tokens.
        return self._envelope(stream=False, choices=choices, usage=usage_json(chunks[-1].usage), with_usage=True)

    async def _events(self, first: GenerateChunk, stream: AsyncIterator[GenerateChunk],
                      include_usage: bool) -> AsyncIterator[bytes]:
        renderers = [CompletionLogprobs(self.frontend.token_text) for _ in range(self.n)]  # one per sequence
        scanners = [self.tool_use.scanner() for _ in range(self.n)] if self.tool_use is not None else []
        usage = None
        try:
            if self.endpoint == "chat":
                for index in range(self.n):
                    # With tools, content stays null (as OpenAI's) unless text comes: the answer may be calls.
                    role = choice("chat", text=None if scanners else "", logprobs=None, finish_reason=None,
                                  stream=True, first=True, index=index)
                    yield _sse(self._envelope(stream=True, choices=[role], usage=None, with_usage=include_usage))
            chunk: GenerateChunk | None = first
            while chunk is not None:
                usage = chunk.usage or usage
                if scanners:
                    for body in self._tool_deltas(scanners[chunk.index], chunk, renderers[chunk.index]):
                        yield _sse(self._envelope(stream=True, choices=[body], usage=None, with_usage=include_usage))
                # An empty delta means text held back (a partial character or a possible stop string).
                elif chunk.text or chunk.finish_reason or (self.logprobs and chunk.token_ids):
                    logprobs = self._logprobs(renderers[chunk.index], [chunk])
                    body = choice(self.endpoint, text=chunk.text, logprobs=logprobs,
                                  finish_reason=chunk.finish_reason, stream=True, index=chunk.index)
                    yield _sse(self._envelope(stream=True, choices=[body], usage=None, with_usage=include_usage))
                chunk = await anext(stream, None)
                if chunk is not None and self.request.app.state.closing:
                    raise Unavailable("the server is shutting down; retry the request")
            if include_usage:
                yield _sse(self._envelope(stream=True, choices=[], usage=usage_json(usage), with_usage=True))
        except Exception as e:  # noqa: BLE001 - headers are gone; the error travels as the last event
            _, body, _ = describe_error(e, self.param_of)
            yield _sse(body)
        finally:
            await _close(stream)
        yield _DONE

    def _tool_deltas(self, scanner: CallScanner | AutoScanner, chunk: GenerateChunk, renderer: CompletionLogprobs,
                     ) -> Iterator[dict[str, Any]]:
        """A chunk's text as chat deltas once its scanner has read it: content, then each piece of a
        call on its own (as OpenAI streams them); the chunk's logprobs ride on the first delta."""
        events: list[Event] = scanner.feed(chunk.text)
        if chunk.finish_reason is not None:
            events += scanner.finish()
        logprobs = self._logprobs(renderer, [chunk]) if self.logprobs and chunk.token_ids else None
        for event in events:
            text, calls = (None, [event.to_json()]) if isinstance(event, CallDelta) else (event, None)
            yield choice("chat", text=text, logprobs=logprobs, finish_reason=None, stream=True, index=chunk.index,
                         tool_calls=calls)
            logprobs = None
        if chunk.finish_reason is not None or logprobs is not None:
            yield choice("chat", text=None, logprobs=logprobs, index=chunk.index, stream=True,
                         finish_reason=_tool_finish(chunk.finish_reason, scanner.num_calls))


def _tool_finish(finish_reason: str | None, num_calls: int) -> str | None:
    """A sequence that stopped after making calls finished with "tool_calls"; a cut one stays "length"."""
    return "tool_calls" if finish_reason == "stop" and num_calls else finish_reason


def _cache_header(chunk: GenerateChunk | None) -> dict[str, str]:
    """The response cache's part in the answer, when the cache is on."""
    return {CACHE_STATUS_KEY: chunk.cache} if chunk is not None and chunk.cache is not None else {}


def set_ready(app: FastAPI, ready: bool) -> None:
    """Whether /health answers 200 and new generation requests are taken (false while draining)."""
    app.state.ready = ready


def create_app(frontend: Frontend, *, max_request_bytes: int = 1 << 20, ready: bool = True,
               gate: Gate | None = None) -> FastAPI:
    app = FastAPI(title="Switchyard", summary="OpenAI-compatible API of the Switchyard front door")
    app.state.ready = ready
    app.state.closing = False  # set by HttpServer.stop once the grace is over
    gate = gate or Gate()
    if gate.enabled:
        _require_gate(app, gate)
    metrics.instrument_http(app)
    created = int(time.time())

    def model_card() -> dict[str, Any]:
        return {"id": frontend.model_name, "object": "model", "created": created, "owned_by": "switchyard",
                "root": frontend.model_name, "parent": None, "max_model_len": frontend.max_model_len}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _Generation("completions", frontend, request, max_request_bytes, gate).respond()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _Generation("chat", frontend, request, max_request_bytes, gate).respond()

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> Response:
        if model_id != frontend.model_name:
            return error_response(NotFound(f"The model `{model_id}` does not exist.", field="model"))
        return JSONResponse(model_card())

    @app.get("/health")
    async def health() -> Response:
        if app.state.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = param_from_loc(tuple(first["loc"])[1:])
        return error_response(HttpError(400, f"{param or 'request'}: {first['msg']}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_exception(request: Request, exc: StarletteHTTPException) -> Response:
        err_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        status, body, _ = error_body(exc.status_code, str(exc.detail), err_type)
        return JSONResponse(body, status_code=status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    return app


class _Server(uvicorn.Server):
    """uvicorn inside the caller's loop; signals stay with the process's gRPC bootstrap."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.started_event = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.started_event.set()


class HttpServer:
    """A running uvicorn server; `port` is the bound one (differs from the asked one for port 0)."""

    def __init__(self, app: FastAPI, server: _Server, task: asyncio.Task[None], host: str, port: int,
                 grace_s: float) -> None:
        self._app = app
        self._server = server
        self._task = task
        self.host = host
        self.port = port
        self.grace_s = grace_s

    async def stop(self, grace_s: float | None = None) -> None:
        """Stops listening and lets running responses finish for up to the grace; then streams still
        running end with an error event at their next chunk, and whatever is left is cancelled.
        Safe to call more than once."""
        grace_s = self.grace_s if grace_s is None else grace_s
        if not self._server.should_exit:
            set_ready(self._app, False)
            self._server.config.timeout_graceful_shutdown = grace_s + _CUT_MARGIN_S  # type: ignore[assignment]
            self._server.should_exit = True
            closer = asyncio.get_running_loop().call_later(grace_s, setattr, self._app.state, "closing", True)
            self._task.add_done_callback(lambda _: closer.cancel())
        await asyncio.shield(self._task)


def _require_gate(app: FastAPI, gate: Gate) -> None:
    """API keys and rate limits on /v1/*; /health stays open for probes, like gRPC health."""

    @app.middleware("http")
    async def check_key(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path.startswith("/v1/"):
            try:
                gate.admit(request.headers.get("authorization"))
            except SwitchyardError as e:
                response = error_response(e)
                if isinstance(e, Unauthenticated):
                    response.headers["WWW-Authenticate"] = "Bearer"
                return response
        return await call_next(request)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.setblocking(False)
    return sock


async def serve_http(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, grace_s: float = 5.0,
                     access_log: bool = False, tls: TlsConfig | None = None) -> HttpServer:
    """Starts serving `app` in the running loop and returns once the socket accepts connections."""
    sock = _bind(host, port)  # bind here: a taken port raises OSError now, not SystemExit later
    config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=access_log, ws="none",
                            server_header=False, **(tls.uvicorn_options() if tls is not None else {}))
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"http-{host}:{port}")
    started = asyncio.create_task(server.started_event.wait())
    await asyncio.wait((task, started), return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        started.cancel()
        sock.close()
        try:
            await task
        except SystemExit as e:  # uvicorn exits the process when startup fails; this is a library call
            raise RuntimeError(f"HTTP server on {host}:{port} failed to start") from e
        raise RuntimeError(f"HTTP server on {host}:{port} exited during startup")
    return HttpServer(app, server, task, host, sock.getsockname()[1], grace_s)
