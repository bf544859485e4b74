"""The one place that turns typed errors into gRPC status codes, and statuses back into errors.

Service cores raise `shared.errors` exceptions and know nothing of gRPC; `ErrorInterceptor` converts
them at the edge, so every service answers the same code, message and retry hint for the same
failure. Anything else that escapes a handler is a bug: the client gets INTERNAL with a short error
id it can quote, and the traceback stays in the server log next to that id and the trace id. Clients
go the other way with `error_from_rpc` (a call's status) or `error_from_status` (a status carried in
a message, as on the scheduler's Connect stream), so a downstream failure is re-raised typed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
import grpc.aio
from opentelemetry import trace

from shared.errors import (
    DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted,
    SwitchyardError, Unauthenticated, Unavailable,
)
from shared.telemetry import current_trace_id

logger = logging.getLogger(__name__)

# Trailing-metadata keys; lower case because gRPC metadata keys must be.
RETRY_AFTER_MS_KEY = "retry-after-ms"
# gRPC's own retry policy (a client's service config) waits this long before its next attempt,
# instead of its backoff: so clients that retry RESOURCE_EXHAUSTED follow our hint without code.
RETRY_PUSHBACK_MS_KEY = "grpc-retry-pushback-ms"
FIELD_KEY = "switchyard-field"
# Used by error_from_status when a RESOURCE_EXHAUSTED status came without a retry hint.
DEFAULT_RETRY_AFTER_S = 1.0

# The only table of codes. A bare SwitchyardError has no better meaning than "server bug".
_STATUS_BY_ERROR: dict[type[SwitchyardError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    SwitchyardError: grpc.StatusCode.INTERNAL,
}
_ERROR_BY_STATUS: dict[grpc.StatusCode, type[SwitchyardError]] = {
    code: cls for cls, code in _STATUS_BY_ERROR.items() if cls is not SwitchyardError
}


def status_code_for(error_type: type[SwitchyardError]) -> grpc.StatusCode:
    """The status code of an error class; subclasses of subclasses inherit their parent's code."""
    for cls in error_type.__mro__:
        if cls in _STATUS_BY_ERROR:
            return _STATUS_BY_ERROR[cls]
    raise TypeError(f"{error_type!r} is not a SwitchyardError")


def trailing_metadata_for(error: SwitchyardError) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    if error.field:
        pairs.append((FIELD_KEY, error.field))
    if isinstance(error, ResourceExhausted):
        retry_after_ms = str(round(error.retry_after_s * 1000))
        pairs += [(RETRY_AFTER_MS_KEY, retry_after_ms), (RETRY_PUSHBACK_MS_KEY, retry_after_ms)]
    return tuple(pairs)


def error_from_rpc(e: grpc.aio.AioRpcError) -> SwitchyardError:
    """The typed error a failed call stands for, so clients can re-raise or branch on it.

    Codes with no typed error (CANCELLED, UNIMPLEMENTED, INTERNAL, ...) come back as a plain
    `SwitchyardError` whose message keeps the code name.
    """
    metadata = {key: value for key, value in (e.trailing_metadata() or ()) if isinstance(value, str)}
    try:
        retry_after_s = max(0.0, float(metadata[RETRY_AFTER_MS_KEY]) / 1000)
    except (KeyError, ValueError):
        retry_after_s = None
    return error_from_status(e.code(), e.details() or "", metadata.get(FIELD_KEY), retry_after_s)


def error_from_status(code: grpc.StatusCode, details: str, field: str | None = None,
                      retry_after_s: float | None = None) -> SwitchyardError:
    """The typed error of a status carried in a message rather than as a call's status (one
    request's end on a stream that carries many)."""
    cls = _ERROR_BY_STATUS.get(code)
    if cls is InvalidArgument:
        if not field:
            # A server that is not ours may still follow the "field: reason" convention.
            head, sep, _ = details.partition(": ")
            field = head if sep and " " not in head else "request"
        return InvalidArgument(details, field=field)
    if cls is ResourceExhausted:
        if retry_after_s is None:
            retry_after_s = DEFAULT_RETRY_AFTER_S
        return ResourceExhausted(details, retry_after_s=retry_after_s, field=field)
    if cls is not None:
        return cls(details, field)
    return SwitchyardError(f"{code.name}: {details}" if details else code.name, field)


_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_from_number(number: int) -> grpc.StatusCode:
    """The StatusCode of a google.rpc.Code number (UNKNOWN for a number gRPC does not define)."""
    return _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler so that typed errors abort with their code and bugs become INTERNAL.

    Every async streaming handler, whether an async generator or a coroutine that sends with
    `context.write`, is wrapped as an async generator: grpc.aio accepts writes from either, and the
    OpenTelemetry interceptor outside this one can only wrap generators. Synchronous handlers would
    run in a thread pool where awaiting `context.abort` is impossible; Switchyard has none, so they
    are passed through untouched.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        try:
            handler = await continuation(handler_call_details)
        except SwitchyardError as error:
            # An inner interceptor refused the call before any handler existed (e.g. a missing API
            # key). A bidirectional handler aborts without first waiting for a request message, and
            # on the wire it carries the status to a call of any shape.
            return grpc.stream_stream_rpc_method_handler(self._refusal(error, method))
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        wrapped = self._wrap(behavior, method, handler.response_streaming)
        if wrapped is behavior:
            return handler
        deserializer = handler.request_deserializer
        if not handler.request_streaming and deserializer is not None:
            deserializer = _lenient(deserializer)
        return factory(
            wrapped,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(
        self, behavior: Callable[..., Any], method: str, response_streaming: bool
    ) -> Callable[..., Any]:
        is_async = inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)
        if not is_async:
            return behavior
        if response_streaming:

            async def stream_wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await _abort(context, request.error(), method)
                produced = behavior(request, context)
                try:
                    if inspect.isawaitable(produced):
                        await produced  # reader/writer style: the handler sends with context.write
                    else:
                        async for response in produced:
                            yield response
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as error:
                    await _abort(context, error, method)
                finally:
                    # Closing the handler's generator here runs its cleanup (freeing KV blocks,
                    # cancelling downstream calls) now rather than at garbage collection.
                    aclose = getattr(produced, "aclose", None)
                    if aclose is not None:
                        await aclose()

            return stream_wrapper

        async def unary_wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await _abort(context, request.error(), method)
            try:
                return await behavior(request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as error:
                await _abort(context, error, method)

        return unary_wrapper

    @staticmethod
    def _refusal(
        error: SwitchyardError, method: str
    ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
        async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await _abort(context, error, method)
            yield  # pragma: no cover - makes this an async generator; abort always raises

        return refuse


class _Undecodable:
    """Stands in for a request message whose bytes did not parse (corrupt wire format, or a string
    field that is not UTF-8, such as an encoded lone surrogate). grpc would answer a deserializer's
    exception with UNKNOWN; the handler wrapper answers this with INVALID_ARGUMENT instead."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"the message does not parse: {self.reason}", field="request")


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, or anything a parser raises
            return _Undecodable(str(e) or type(e).__name__)

    return deserialize


async def _abort(context: grpc.aio.ServicerContext, error: Exception, method: str) -> NoReturn:
    if isinstance(error, SwitchyardError):
        code = status_code_for(type(error))
        logger.debug("%s -> %s: %s", method, code.name, error.message)
        await context.abort(code, error.message, trailing_metadata_for(error))
    error_id = uuid.uuid4().hex[:8]
    trace_id = current_trace_id()
    span = trace.get_current_span()
    span.record_exception(error)
    span.set_attribute("switchyard.error_id", error_id)
    logger.error(
        "unexpected error in %s (error id %s, trace id %s)", method, error_id, trace_id or "-", exc_info=error
    )
    where = f"error id {error_id}, trace id {trace_id}" if trace_id else f"error id {error_id}"
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({where})")
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises
