"""The one place for gRPC channel and server options, and the channel factory services use.

Both ends are set here together because they must agree: a client that pings more often than the
server allows is sent GOAWAY ("too_many_pings"), and a message limit lower on one side than the
other fails only for the largest prompts or steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import grpc.aio

from shared.tls import TlsConfig

# Long prompts and large batched steps exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Idle streams between services are pinged so a worker that vanished is noticed within about
# KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS, even when no step is in flight.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000

_MESSAGE_SIZE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = _MESSAGE_SIZE_OPTIONS + (
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    # 0 lifts the default cap of two pings without data, which would stop keepalive on idle streams.
    ("grpc.http2.max_pings_without_data", 0),
    # A restarted local service is reachable again within a second, not after minutes of backoff.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)

SERVER_OPTIONS: tuple[tuple[str, int], ...] = _MESSAGE_SIZE_OPTIONS + (
    # Accept the clients' keepalive above: pings without calls, as often as every 10 s.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    # gRPC sets SO_REUSEPORT by default, which lets a second server silently share a taken port;
    # a port clash must fail loudly instead.
    ("grpc.so_reuseport", 0),
)


def _options(keepalive_ms: tuple[int, int] | None) -> list[tuple[str, int]]:
    if keepalive_ms is None:
        return list(CHANNEL_OPTIONS)
    time_ms, timeout_ms = keepalive_ms
    return [*CHANNEL_OPTIONS, ("grpc.keepalive_time_ms", time_ms), ("grpc.keepalive_timeout_ms", timeout_ms)]


def insecure_channel(
    address: str, *, interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    keepalive_ms: tuple[int, int] | None = None,
) -> grpc.aio.Channel:
    """A plaintext channel to another Switchyard service (loopback or a private network)."""
    # Looked up at call time: telemetry instrumentation replaces grpc.aio.insecure_channel.
    return grpc.aio.insecure_channel(address, options=_options(keepalive_ms), interceptors=interceptors)


def open_channel(
    address: str, tls: TlsConfig | None = None, *, interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    keepalive_ms: tuple[int, int] | None = None,
) -> grpc.aio.Channel:
    """A channel to another Switchyard service: TLS (mutual when `tls` has a CA) or plaintext.
    `keepalive_ms` (ping interval, ping timeout) replaces the default for a peer whose silence must
    be noticed sooner (servers accept pings at any rate: max_ping_strikes 0)."""
    if tls is None or not tls.enabled:
        return insecure_channel(address, interceptors=interceptors, keepalive_ms=keepalive_ms)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=_options(keepalive_ms),
                                   interceptors=interceptors)


def open_sync_channel(address: str, tls: TlsConfig | None = None) -> grpc.Channel:
    """A blocking channel for command-line tools and health checks: TLS when `tls` is set."""
    if tls is None or not tls.enabled:
        return grpc.insecure_channel(address, options=list(CHANNEL_OPTIONS))
    return grpc.secure_channel(address, tls.channel_credentials(), options=list(CHANNEL_OPTIONS))
