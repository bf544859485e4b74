"""Typed exceptions, one per gRPC status code the front door answers with on purpose.

Every failed call raises a subclass of `SwitchyardError`. The server puts the offending request field
in the trailing metadata key `switchyard-field` and, on RESOURCE_EXHAUSTED (queue full, rate limit),
the time after which trying again makes sense in `retry-after-ms`; both are read back here into
`error.field` and `ResourceExhausted.retry_after_s`. The original `grpc.RpcError` is the exception's
`__cause__` and is kept as `error.rpc_error`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

__all__ = [
    "SwitchyardError", "InvalidArgument", "ResourceExhausted", "Unavailable", "DeadlineExceeded",
    "Unauthenticated", "PermissionDenied", "NotFound", "FailedPrecondition", "Cancelled", "Internal",
    "Unimplemented", "error_from_rpc_error", "FIELD_METADATA_KEY", "RETRY_AFTER_MS_METADATA_KEY",
]

FIELD_METADATA_KEY = "switchyard-field"
RETRY_AFTER_MS_METADATA_KEY = "retry-after-ms"


class SwitchyardError(Exception):
    """A failed call. `code` is the gRPC status code, `details` the server's message, `field` the
    request field it concerns (or None)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, *, field: str | None = None, code: grpc.StatusCode | None = None,
                 rpc_error: grpc.RpcError | None = None) -> None:
        super().__init__(f"{(code or self.code).name}: {details}" if details else (code or self.code).name)
        if code is not None:
            self.code = code
        self.details = details
        self.field = field
        self.rpc_error = rpc_error


class InvalidArgument(SwitchyardError):
    """A request field is wrong; `field` names it (e.g. `sampling.top_p`). Retrying the same request
    cannot succeed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(SwitchyardError):
    """The front door's queue is full or the API key's rate limit is spent. `retry_after_s` is the
    server's hint (seconds) for when to try again; None if the server sent none."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, details: str, *, retry_after_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(details, **kwargs)
        self.retry_after_s = retry_after_s


class Unavailable(SwitchyardError):
    """No server could take the call: not reachable, draining, or no scheduler or worker up."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(SwitchyardError):
    """The call's deadline passed before it finished (the server aborts the request)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(SwitchyardError):
    """The API key is missing or not one the server knows."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SwitchyardError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(SwitchyardError):
    """What the request names does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(SwitchyardError):
    """The server is not in a state to run the call."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Cancelled(SwitchyardError):
    """The call was cancelled (by this client, or the server went away mid-call)."""

    code = grpc.StatusCode.CANCELLED


class Internal(SwitchyardError):
    """A server bug; the message carries an error id the server's log has next to the traceback."""

    code = grpc.StatusCode.INTERNAL


class Unimplemented(SwitchyardError):
    """The server does not serve this method (an older or different server)."""

    code = grpc.StatusCode.UNIMPLEMENTED


_BY_CODE: dict[grpc.StatusCode, type[SwitchyardError]] = {
    cls.code: cls for cls in (InvalidArgument, ResourceExhausted, Unavailable, DeadlineExceeded, Unauthenticated,
                              PermissionDenied, NotFound, FailedPrecondition, Cancelled, Internal, Unimplemented)
}


def _metadata(pairs: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    return {key: value for key, value in (pairs or ()) if isinstance(value, str)}


def error_from_rpc_error(error: grpc.RpcError) -> SwitchyardError:
    """The typed exception for a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    call: Any = error  # a grpc.Call as well as an RpcError, whatever the type stubs in use say
    code: grpc.StatusCode = call.code()
    details: str = call.details() or ""
    metadata = _metadata(call.trailing_metadata())
    field = metadata.get(FIELD_METADATA_KEY) or None
    cls = _BY_CODE.get(code, SwitchyardError)
    if cls is ResourceExhausted:
        try:
            retry_after_s: float | None = max(0.0, float(metadata[RETRY_AFTER_MS_METADATA_KEY]) / 1000)
        except (KeyError, ValueError):
            retry_after_s = None
        return ResourceExhausted(details, retry_after_s=retry_after_s, field=field, rpc_error=error)
    if cls is SwitchyardError:
        return SwitchyardError(details, field=field, code=code, rpc_error=error)
    return cls(details, field=field, rpc_error=error)
