"""`python -m services.tokenizer`: the front door, gRPC and OpenAI-compatible HTTP in one process."""

from __future__ import annotations

import asyncio
import logging
import math
import sys

from services.tokenizer.codec import Codec
from services.tokenizer.config import TokenizerConfig, parse_config
from services.tokenizer.frontend import Frontend
from services.tokenizer import metrics
from services.tokenizer.http_api import create_app, serve_http
from services.tokenizer.response_cache import ResponseCache
from services.tokenizer.scheduler_client import SchedulerClient
from services.tokenizer.servicer import GenerationServicer
from shared.auth import ApiKeys, Gate, GateInterceptor
from shared.config import ConfigError
from shared.errors import SwitchyardError
from shared.gguf_model import GgufError, served_model_name
from shared.rate_limit import RateLimiter
from shared.server import serve
from shared.telemetry import setup_telemetry, start_metrics_server

logger = logging.getLogger("switchyard.tokenizer")
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


async def run(config: TokenizerConfig) -> None:
    telemetry = setup_telemetry("switchyard-tokenizer")
    codec = Codec(config.model_dir)
    gate = make_gate(config)
    scheduler = SchedulerClient(config.scheduler_address, config.tls,
                                stream_interval_s=config.stream_interval_ms / 1000,
                                failover_timeout_s=config.failover_timeout_s)
    frontend = Frontend(codec, scheduler, model_name=config.model_name or served_model_name(config.model_dir),
                        response_cache=make_response_cache(config))
    servicer = GenerationServicer(frontend, version=config.version, max_request_bytes=config.max_request_bytes,
                                  gate=gate)
    app = create_app(frontend, max_request_bytes=config.max_request_bytes, gate=gate) if config.http_port else None
    http = await serve_http(app, config.http_host, config.http_port, grace_s=config.grace_s,
                            tls=config.tls) if app is not None else None
    if http is not None:
        logger.info("OpenAI-compatible HTTP on %s://%s:%d/v1", config.tls.scheme, config.http_host, http.port)
    start_metrics_server(config.metrics_port, config.host, config.tls)

    async def drain() -> None:
        # Both listeners drain together: new calls are refused, calls in flight run to their end.
        await asyncio.gather(servicer.drain(), *([http.stop()] if http is not None else []))

    try:
        await serve(service_name="tokenizer", register=servicer.register, address=config.address,
                    grace_s=config.grace_s, on_drain=drain, telemetry=telemetry, tls=config.tls,
                    interceptors=[GateInterceptor(gate)] if gate.enabled else ())
    finally:
        if http is not None:
            await http.stop()
        await scheduler.close()


def make_response_cache(config: TokenizerConfig) -> ResponseCache | None:
    if config.response_cache_mib <= 0:
        return None
    cache = ResponseCache(config.response_cache_bytes, config.response_cache_ttl_s,
                          on_evict=metrics.observe_cache_eviction)
    metrics.observe_response_cache(cache)
    logger.info("response cache: %g MiB, TTL %g s, for greedy and seeded requests", config.response_cache_mib,
                config.response_cache_ttl_s)
    return cache


def make_gate(config: TokenizerConfig) -> Gate:
    api_keys = ApiKeys.from_file(config.api_keys_file) if config.api_keys_file else None
    limiter = None
    if config.rate_limit_per_s > 0:
        burst = config.rate_limit_burst or max(1, math.ceil(config.rate_limit_per_s))
        limiter = RateLimiter(config.rate_limit_per_s, burst)
    if api_keys is not None:
        logger.info("API keys required (%d configured)", len(api_keys))
    elif config.http_host not in _LOOPBACK or config.host not in _LOOPBACK:
        logger.warning("listening beyond loopback without API keys: anyone who can reach the port can generate")
    return Gate(api_keys, limiter)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = parse_config(argv)
        asyncio.run(run(config))
    except (ConfigError, FileNotFoundError, GgufError, SwitchyardError) as e:
        logger.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
