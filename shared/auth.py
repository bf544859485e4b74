"""API keys and per-key rate limits at the front door, for gRPC metadata and HTTP headers alike.

Keys come from a file (`--api-keys-file`), one per line as `name:secret` or a bare `secret`
(named `key-<line>`), `#` comments allowed. A file rather than a flag or variable because process
listings and `/proc/*/environ` show those. The name is what logs, metrics and rate-limit buckets
see; the secret is held in memory and compared, nothing else.

A presented key is compared against every configured key with `hmac.compare_digest`, without
stopping at a match, so the time taken does not reveal which key, or how much of one, matched.

Health checks and reflection stay open: orchestrators probe without credentials, and neither
returns anything a key protects.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from shared.errors import InvalidArgument, ResourceExhausted, Unauthenticated
from shared.rate_limit import RateLimiter

logger = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"
_BEARER = "bearer "
# Calls any client may make without a key.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ApiKeys:
    """The configured keys: secret -> name."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        if not keys:
            raise InvalidArgument("no API keys configured", field="api_keys_file")
        self._keys = [(secret.encode(), name) for secret, name in keys.items()]

    @classmethod
    def from_file(cls, path: str) -> ApiKeys:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise InvalidArgument(f"cannot read {path!r}: {e.strerror or e}", field="api_keys_file") from e
        keys: dict[str, str] = {}
        for number, raw in enumerate(lines, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, secret = line.partition(":")
            if not sep:
                name, secret = f"key-{number}", line
            name, secret = name.strip(), secret.strip()
            if not name or len(secret) < 8 or any(c.isspace() for c in secret):
                raise InvalidArgument(f"line {number}: expected 'name:secret' with a secret of at least 8 "
                                      f"characters and no spaces", field="api_keys_file")
            if secret in keys:
                raise InvalidArgument(f"line {number}: the same secret appears twice", field="api_keys_file")
            keys[secret] = name
        return cls(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def identify(self, authorization: str | None) -> str:
        """The name of the key in an `Authorization: Bearer <key>` value; Unauthenticated otherwise."""
        if not authorization:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'", field="authorization")
        if authorization[: len(_BEARER)].lower() != _BEARER:
            raise Unauthenticated("the authorization value must be 'Bearer <key>'", field="authorization")
        presented = authorization[len(_BEARER):].strip().encode()
        found: str | None = None
        for secret, name in self._keys:  # no early exit: every key costs the same
            if hmac.compare_digest(presented, secret) and found is None:
                found = name
        if found is None:
            raise Unauthenticated("invalid API key", field="authorization")
        return found


@dataclass
class Gate:
    """API keys plus optional per-key rate limits: what every front-door call passes through."""

    api_keys: ApiKeys | None = None
    rate_limiter: RateLimiter | None = None
    clock: Callable[[], float] = time.monotonic

    @property
    def enabled(self) -> bool:
        return self.api_keys is not None or self.rate_limiter is not None

    def key_name(self, authorization: str | None) -> str:
        """The name of the presented key ("" if keys are off), without taking from its bucket: for
        handlers that need to know whose call they serve after `admit` let it in."""
        return self.api_keys.identify(authorization) if self.api_keys is not None else ""

    def admit(self, authorization: str | None) -> str:
        """Checks the key and takes one request from its bucket; returns the key's name ("" if keys are off)."""
        name = self.key_name(authorization)
        if self.rate_limiter is not None:
            wait_s = self.rate_limiter.take(name, self.clock())
            if wait_s > 0:
                who = f"API key {name!r}" if name else "this front door"
                raise ResourceExhausted(f"rate limit of {self.rate_limiter.rate_per_s:g} requests/s for {who} "
                                        f"exceeded; retry in {wait_s * 1000:.0f} ms", retry_after_s=wait_s)
        return name


class GateInterceptor(grpc.aio.ServerInterceptor):
    """Runs `Gate.admit` before every call except health and reflection.

    It raises the typed error; the ErrorInterceptor outside it turns that into the status code, so
    a refused call looks the same as any other typed error on the wire.
    """

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if not method.startswith(OPEN_METHOD_PREFIXES):
            metadata = handler_call_details.invocation_metadata or ()
            authorization = next((str(v) for k, v in metadata if k == AUTHORIZATION_KEY), None)
            self._gate.admit(authorization)
        return await continuation(handler_call_details)
