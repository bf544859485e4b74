"""Front-door configuration: flags with environment fallbacks. The only module here that reads
the environment."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from shared.config import env_float, env_int, env_str
from shared.tls import TlsConfig, add_tls_arguments, tls_from_args


# A stream's tokens go out at most this often; tokens that come faster share a message. A model
# slower than 100 tokens/s per stream (every CPU model here) sends every step's token as it comes;
# a faster one stops paying a whole message (about 80 us of gRPC on each side) per token.
DEFAULT_STREAM_INTERVAL_MS = 10.0
# Long enough for repeats within a session of work to hit, short enough that a stale answer (the
# same model version, a changed front door) does not linger.
DEFAULT_RESPONSE_CACHE_TTL_S = 300.0
MIN_RESPONSE_CACHE_MIB = 1 / 1024  # 1 KiB: below it no answer fits


@dataclass(frozen=True)
class TokenizerConfig:
    model_dir: str
    model_name: str | None
    scheduler_address: str
    host: str
    port: int
    http_host: str
    http_port: int
    metrics_port: int
    max_request_bytes: int
    version: str
    grace_s: float
    api_keys_file: str = ""  # empty: no API keys required
    rate_limit_per_s: float = 0.0  # per API key (or for everyone without keys); 0: no limit
    rate_limit_burst: int = 0  # bucket size; 0: one second's worth, at least 1
    stream_interval_ms: float = DEFAULT_STREAM_INTERVAL_MS
    response_cache_mib: float = 0.0  # 0: no response cache
    response_cache_ttl_s: float = DEFAULT_RESPONSE_CACHE_TTL_S
    failover_timeout_s: float = 30.0
    tls: TlsConfig = TlsConfig()

    @property
    def response_cache_bytes(self) -> int:
        return int(self.response_cache_mib * (1 << 20))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_config(argv: list[str] | None = None) -> TokenizerConfig:
    p = argparse.ArgumentParser(prog="python -m services.tokenizer", description="Switchyard front door")
    p.add_argument("--model", default=env_str("SWITCHYARD_MODEL", "models/smollm2-135m-instruct"),
                   help="model directory holding tokenizer.json and the chat template, or a .gguf file "
                        "[SWITCHYARD_MODEL]")
    p.add_argument("--model-name", default=env_str("SWITCHYARD_MODEL_NAME", "") or None,
                   help="served model name; default the directory name or file stem [SWITCHYARD_MODEL_NAME]")
    p.add_argument("--scheduler", default=env_str("SWITCHYARD_SCHEDULER_ADDRESS", "127.0.0.1:50052"),
                   help="scheduler address, or several comma-separated (active/standby; 'dns:host:port' for "
                        "every address record of host): a request whose scheduler goes away resumes on the "
                        "next [SWITCHYARD_SCHEDULER_ADDRESS]")
    p.add_argument("--failover-timeout-s", type=float,
                   default=env_float("SWITCHYARD_FAILOVER_TIMEOUT_S", 30.0, min_value=0),
                   help="how long a request whose scheduler went away keeps trying the others before it "
                        "fails UNAVAILABLE [SWITCHYARD_FAILOVER_TIMEOUT_S]")
    p.add_argument("--host", default=env_str("SWITCHYARD_TOKENIZER_HOST", "127.0.0.1"),
                   help="gRPC listen host [SWITCHYARD_TOKENIZER_HOST]")
    p.add_argument("--port", type=int, default=env_int("SWITCHYARD_TOKENIZER_PORT", 50051, min_value=0),
                   help="gRPC port [SWITCHYARD_TOKENIZER_PORT]")
    p.add_argument("--http-host", default=env_str("SWITCHYARD_HTTP_HOST", "127.0.0.1"),
                   help="OpenAI-compatible HTTP host [SWITCHYARD_HTTP_HOST]")
    p.add_argument("--http-port", type=int, default=env_int("SWITCHYARD_HTTP_PORT", 8000, min_value=0),
                   help="OpenAI-compatible HTTP port; 0 disables [SWITCHYARD_HTTP_PORT]")
    p.add_argument("--metrics-port", type=int, default=env_int("SWITCHYARD_TOKENIZER_METRICS_PORT", 9101, min_value=0),
                   help="Prometheus /metrics port; 0 disables [SWITCHYARD_TOKENIZER_METRICS_PORT]")
    p.add_argument("--max-request-bytes", type=int,
                   default=env_int("SWITCHYARD_MAX_REQUEST_BYTES", 1 << 20, min_value=1024),
                   help="largest accepted request [SWITCHYARD_MAX_REQUEST_BYTES]")
    p.add_argument("--version", dest="version_label", default=env_str("SWITCHYARD_MODEL_VERSION", "v1"),
                   help="model version label reported by GetModelInfo [SWITCHYARD_MODEL_VERSION]")
    p.add_argument("--grace-s", type=float, default=env_float("SWITCHYARD_GRACE_S", 10.0))
    p.add_argument("--api-keys-file", default=env_str("SWITCHYARD_API_KEYS_FILE", ""),
                   help="file of 'name:secret' lines; set: every gRPC and HTTP call needs "
                        "'authorization: Bearer <secret>' [SWITCHYARD_API_KEYS_FILE]")
    p.add_argument("--rate-limit-per-s", type=float, default=env_float("SWITCHYARD_RATE_LIMIT_PER_S", 0.0, min_value=0),
                   help="requests per second per API key (token bucket); 0: unlimited [SWITCHYARD_RATE_LIMIT_PER_S]")
    p.add_argument("--rate-limit-burst", type=int, default=env_int("SWITCHYARD_RATE_LIMIT_BURST", 0, min_value=0),
                   help="requests a key may send at once; 0: one second's worth [SWITCHYARD_RATE_LIMIT_BURST]")
    p.add_argument("--stream-interval-ms", type=float,
                   default=env_float("SWITCHYARD_STREAM_INTERVAL_MS", DEFAULT_STREAM_INTERVAL_MS, min_value=0),
                   help="send a stream's new tokens at most this often; tokens that arrive sooner share the "
                        "next message (the first token and the last are never held); 0: every scheduler "
                        "event at once [SWITCHYARD_STREAM_INTERVAL_MS]")
    p.add_argument("--response-cache-mib", type=float,
                   default=env_float("SWITCHYARD_RESPONSE_CACHE_MIB", 0.0, min_value=0),
                   help="memory for the response cache of deterministic requests (temperature 0 or a seed), "
                        "least recently used out first; 0 turns it off [SWITCHYARD_RESPONSE_CACHE_MIB]")
    p.add_argument("--response-cache-ttl-s", type=float,
                   default=env_float("SWITCHYARD_RESPONSE_CACHE_TTL_S", DEFAULT_RESPONSE_CACHE_TTL_S),
                   help="how long a cached response may be served after it was computed "
                        "[SWITCHYARD_RESPONSE_CACHE_TTL_S]")
    add_tls_arguments(p)
    a = p.parse_args(argv)
    if a.stream_interval_ms < 0 or a.stream_interval_ms != a.stream_interval_ms:
        p.error(f"--stream-interval-ms: must be >= 0, got {a.stream_interval_ms}")
    mib = a.response_cache_mib
    if not math.isfinite(mib) or mib < 0 or 0 < mib < MIN_RESPONSE_CACHE_MIB:
        p.error(f"--response-cache-mib: must be 0 (off) or a finite number >= 1/1024 (1 KiB), got {mib}")
    if not math.isfinite(a.response_cache_ttl_s) or a.response_cache_ttl_s <= 0:
        p.error(f"--response-cache-ttl-s (SWITCHYARD_RESPONSE_CACHE_TTL_S): must be a finite number of seconds "
                f"> 0, got {a.response_cache_ttl_s}")
    return TokenizerConfig(
        model_dir=a.model, model_name=a.model_name, scheduler_address=a.scheduler, host=a.host, port=a.port,
        http_host=a.http_host, http_port=a.http_port, metrics_port=a.metrics_port,
        max_request_bytes=a.max_request_bytes, version=a.version_label, grace_s=a.grace_s,
        api_keys_file=a.api_keys_file, rate_limit_per_s=a.rate_limit_per_s, rate_limit_burst=a.rate_limit_burst,
        stream_interval_ms=a.stream_interval_ms, response_cache_mib=a.response_cache_mib,
        response_cache_ttl_s=a.response_cache_ttl_s, failover_timeout_s=a.failover_timeout_s, tls=tls_from_args(a),
    )
