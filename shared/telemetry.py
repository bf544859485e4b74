"""Tracing and metrics setup shared by every service.

One call per process wires OpenTelemetry the same way everywhere: a tracer provider named after the
service, gRPC instrumentation on both sides so W3C trace context rides in metadata from tokenizer to
scheduler to worker, and an OTLP exporter only when the standard endpoint variable says where to
send spans. Without an endpoint nothing leaves the process, spans end in a processor-less provider
and cost a few microseconds, yet trace ids still exist so logs of one request can be joined.

The OpenTelemetry globals (tracer provider, instrumented `grpc.aio.server` / `insecure_channel`)
can be set once per process, so setup is idempotent: tests start several services in one process.
Instrumentation patches the `grpc.aio` factories, so it must run before servers and channels are
created, and those must be created through `grpc.aio.<name>` looked up at call time.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import prometheus_client
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider

from shared.tls import TlsConfig

logger = logging.getLogger(__name__)

# The OTLP exporter reads these itself; we only look at them to decide whether to export at all.
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_FLUSH_TIMEOUT_S = 5.0


@dataclass
class Telemetry:
    """Handle on this process's tracing; `shutdown()` belongs at the end of a service's shutdown."""

    service_name: str
    tracer_provider: TracerProvider
    exporting: bool

    def tracer(self, name: str) -> trace.Tracer:
        return self.tracer_provider.get_tracer(name)

    def shutdown(self, timeout_s: float = _FLUSH_TIMEOUT_S) -> None:
        """Flushes spans still queued for export, waiting at most `timeout_s`.

        The provider itself stays up (the SDK shuts it down at interpreter exit), so a service
        restarted in the same process, as in tests, keeps tracing.
        """
        if not self.exporting:
            return
        # force_flush does not honour its own timeout while an export to an unreachable collector
        # is retrying, so the wait is bounded here; the daemon thread cannot hold up exit.
        flusher = threading.Thread(
            target=self.tracer_provider.force_flush, kwargs={"timeout_millis": int(timeout_s * 1000)},
            name="telemetry-flush", daemon=True,
        )
        flusher.start()
        flusher.join(timeout_s)
        if flusher.is_alive():
            logger.warning("telemetry: spans not flushed within %.1fs; is the collector up?", timeout_s)


_lock = threading.Lock()
_telemetry: Telemetry | None = None


def tracing_wanted(exporting: bool) -> bool:
    """`SWITCHYARD_TRACING`: "auto" (default) traces only when spans are exported, so a process
    without a collector pays nothing (no gRPC instrumentation, no-op spans); "on" traces anyway
    (trace ids in logs), "off" never does."""
    mode = os.environ.get("SWITCHYARD_TRACING", "auto").strip().lower() or "auto"
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"SWITCHYARD_TRACING must be auto, on or off, got {mode!r}")
    return exporting if mode == "auto" else mode == "on"


def setup_telemetry(service_name: str, *, enabled: bool | None = None) -> Telemetry:
    """Configures tracing for this process once; later calls return the same handle.

    `enabled` overrides `SWITCHYARD_TRACING`; a disabled process keeps OpenTelemetry's no-op
    tracer, so span calls in the services cost next to nothing and nothing is exported."""
    global _telemetry
    with _lock:
        if _telemetry is not None:
            if _telemetry.service_name != service_name:
                # The resource of a global provider cannot change; spans keep the first name.
                logger.info(
                    "telemetry already set up as %r; %r shares it", _telemetry.service_name, service_name
                )
            return _telemetry
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
        exporting = any(os.environ.get(name) for name in _ENDPOINT_VARS)
        if not (tracing_wanted(exporting) if enabled is None else enabled):
            _telemetry = Telemetry(service_name=service_name, tracer_provider=provider, exporting=False)
            logger.info("telemetry for %s: tracing off (no OTLP endpoint)", service_name)
            return _telemetry
        if exporting:
            # Imported here so a process without an endpoint never loads the exporter's stack.
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        _instrument_grpc()
        _telemetry = Telemetry(service_name=service_name, tracer_provider=provider, exporting=exporting)
        logger.info("telemetry for %s: %s", service_name, "OTLP export" if exporting else "no exporter")
        return _telemetry


def _instrument_grpc() -> None:
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer
    from opentelemetry.instrumentation.grpc import filters

    # Health probes arrive every few seconds and would drown real traces; health Watch and
    # reflection also use the reader/writer streaming API that the instrumentation cannot wrap.
    # The scheduler's Connect stream lives as long as the front door and carries many requests,
    # each with its own trace context in its submission: one span for it would belong to no trace.
    not_plumbing = filters.negate(
        filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection."),
                       filters.method_name("Connect"))
    )
    for instrumentor in (
        GrpcAioInstrumentorServer(filter_=not_plumbing),
        GrpcAioInstrumentorClient(filter_=not_plumbing),
    ):
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()


def current_trace_id() -> str | None:
    """The 32-hex-digit id of the active trace, or None outside any span."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


# Histogram buckets (seconds) shared by every service, so panels of one kind line up across
# services. CPU serving spans a 1 ms decode step to a minute-long request; the steps are dense
# below 1 s, where TTFT and inter-token latency live.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
                     1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0)


def start_metrics_server(port: int | None, host: str = "127.0.0.1", tls: TlsConfig | None = None) -> int | None:
    """Serves Prometheus /metrics from a daemon thread; port 0 or None disables it.

    With `tls` it serves HTTPS (and requires a client certificate when `tls` is mutual), like every
    other listener. Returns the port actually listening, or None when disabled.
    """
    if not port:
        return None
    try:
        options = tls.prometheus_options() if tls is not None else {}
        server, _thread = prometheus_client.start_http_server(port, addr=host, **options)
    except OSError as e:
        raise RuntimeError(f"cannot serve Prometheus metrics on {host}:{port}: {e.strerror or e}") from e
    logger.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return int(server.server_port)
