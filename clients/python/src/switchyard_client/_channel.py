"""How the client's channel is made: credentials, the API key, the retry service config, options."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import grpc

from .types import RetryPolicy, Tls

SERVICE = "switchyard.api.v1.Generation"
# The server accepts messages up to 64 MiB (long prompts); gRPC's default receive limit is 4 MiB.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
USER_AGENT = "switchyard-client-python/0.1.0"


def service_config(retry: RetryPolicy | None) -> str:
    """The channel's service config (JSON): the retry policy for every method of the service."""
    if retry is None:
        return json.dumps({"methodConfig": [{"name": [{"service": SERVICE}]}]})
    return json.dumps({
        "methodConfig": [{
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": retry.max_attempts,
                "initialBackoff": f"{retry.initial_backoff_s:g}s",
                "maxBackoff": f"{retry.max_backoff_s:g}s",
                "backoffMultiplier": retry.backoff_multiplier,
                "retryableStatusCodes": list(retry.retryable_status_codes),
            },
        }],
        "retryThrottling": {"maxTokens": retry.throttle_max_tokens, "tokenRatio": retry.throttle_token_ratio},
    })


def channel_options(retry: RetryPolicy | None, tls: Tls | None,
                    extra: list[tuple[str, Any]] | None = None) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.enable_retries", 1 if retry is not None else 0),
        ("grpc.service_config", service_config(retry)),
        # The service config above is the client's own; a resolver's (DNS TXT) must not replace it.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.primary_user_agent", USER_AGENT),
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options + list(extra or ())


def is_loopback(address: str) -> bool:
    """Whether `address` (host:port, [v6]:port, unix:path) stays on this machine."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    target = address.split("///", 1)[-1] if "://" in address else address
    if target.startswith("["):
        host = target[1:target.find("]")]
    else:
        host = target.rsplit(":", 1)[0] if target.count(":") == 1 else target
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def credentials(address: str, api_key: str | None, tls: Tls | None,
                insecure: bool) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, str]]]:
    """Channel credentials (None: a plaintext channel) and metadata to send with every call.

    Secure by default: the API key travels as call credentials (`authorization: Bearer <key>`), which
    gRPC only sends over a channel it considers secure. That is TLS, or, for a loopback or unix
    address without TLS, gRPC's local credentials (plaintext on the wire, but the peer is checked to
    be on this machine). Any other address without `tls` gets TLS with the system's roots. Only
    `insecure=True` makes a plaintext channel to another machine, and then the key goes as plain
    per-call metadata, readable by anyone on the path.
    """
    if api_key is not None and (not api_key or any(c.isspace() for c in api_key)):
        raise ValueError("api_key must be a non-empty string without whitespace")
    if insecure:
        if tls is not None:
            raise ValueError("insecure=True and tls= contradict each other")
        return None, ([("authorization", f"Bearer {api_key}")] if api_key else [])
    if tls is not None or not is_loopback(address):
        tls = tls or Tls()
        channel: grpc.ChannelCredentials = grpc.ssl_channel_credentials(
            _read(tls.ca_file), _read(tls.key_file), _read(tls.cert_file))
    else:
        kind = grpc.LocalConnectionType.UDS if address.startswith("unix") else grpc.LocalConnectionType.LOCAL_TCP
        channel = grpc.local_channel_credentials(kind)
    if api_key:
        channel = grpc.composite_channel_credentials(channel, grpc.access_token_call_credentials(api_key))
    return channel, []
