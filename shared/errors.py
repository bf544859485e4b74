"""Typed errors: what a service raises on purpose, with the request field it concerns.

Plain exceptions that import nothing: service cores (the batcher, the router, the front door's
validation) raise them without knowing of gRPC. `shared.grpc_errors` is the one place that maps
them to gRPC status codes at the edge and back again in clients.
"""

from __future__ import annotations

class SwitchyardError(Exception):
    """Base of every error a service raises on purpose; `field` names the offending request field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(SwitchyardError):
    """A request field is wrong. The message always starts with the field name."""

    def __init__(self, message: str, field: str) -> None:
        if not field:
            raise ValueError("InvalidArgument needs the name of the offending field")
        # Callers may write either "must be > 0" or "sampling.top_p: must be > 0"; both read the same.
        if not message.startswith(field):
            message = f"{field}: {message}"
        super().__init__(message, field)


class ResourceExhausted(SwitchyardError):
    """Queue full or rate limited; `retry_after_s` tells the client when trying again makes sense."""

    def __init__(self, message: str, *, retry_after_s: float, field: str | None = None) -> None:
        if retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {retry_after_s}")
        super().__init__(message, field)
        self.retry_after_s = float(retry_after_s)


class Unavailable(SwitchyardError):
    """No backend can take the request right now (draining, no worker of the pool up)."""


class DeadlineExceeded(SwitchyardError):
    """The request's deadline passed before it finished."""


class Unauthenticated(SwitchyardError):
    """The API key is missing or wrong."""


class NotFound(SwitchyardError):
    """A named thing (model, request id, pool) does not exist."""


class FailedPrecondition(SwitchyardError):
    """The request is valid but the system is not in a state to run it."""
