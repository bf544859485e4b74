"""An in-process OTLP trace collector for the end-to-end tests: real spans over real gRPC."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc

from deploy.stack import Stack, StackConfig, start_stack, stop_stack


class Collector(otlp_grpc.TraceServiceServicer):
    """The OTLP trace endpoint, keeping every span with the service that sent it."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self._lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 (gRPC method name)
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "?")
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return otlp_pb.ExportTraceServiceResponse()

    def named(self, name: str) -> list[tuple[str, object]]:
        with self._lock:
            return [(service, span) for service, span in self.spans if span.name == name]

    def serialized(self) -> list[bytes]:
        with self._lock:
            return [span.SerializeToString() for _, span in self.spans]


@contextmanager
def otlp_collector() -> Iterator[tuple[Collector, dict[str, str]]]:
    """A running collector and the environment that points a service's exporter at it."""
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    otlp_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield collector, {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                          "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "200"}
    finally:
        server.stop(0)


@contextmanager
def stack_with_collector(config: StackConfig) -> Iterator[tuple[Stack, Collector]]:
    """The stack of `config` exporting its spans to a fresh collector; stopped on exit."""
    with otlp_collector() as (collector, env):
        with pytest.MonkeyPatch.context() as mp:  # only the children see the exporter settings
            for key, value in env.items():
                mp.setenv(key, value)
            stack = start_stack(config)
        try:
            yield stack, collector
        finally:
            stop_stack(config.run_dir, quiet=True)
