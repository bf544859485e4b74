"""Telemetry setup is idempotent, carries trace context over gRPC, and serves Prometheus metrics.

setup_telemetry patches process-wide grpc.aio factories; that is harmless for the other tests here,
which then simply run instrumented, as services do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import sys
import urllib.request
from pathlib import Path

import grpc
import grpc.aio
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from shared.channel import insecure_channel
from shared.server import GrpcServer
from shared.telemetry import current_trace_id, setup_telemetry, start_metrics_server

from .conftest import Probe, method


def test_setup_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    first = setup_telemetry("switchyard-test", enabled=True)
    assert setup_telemetry("switchyard-test", enabled=True) is first
    assert setup_telemetry("another", enabled=True) is first
    assert trace.get_tracer_provider() is first.tracer_provider
    first.shutdown()  # a flush; tracing keeps working afterwards
    assert current_trace_id() is None
    with first.tracer("t").start_as_current_span("s"):
        assert re.fullmatch(r"[0-9a-f]{32}", current_trace_id() or "")


async def test_trace_id_travels_to_server_logs(probe: Probe, caplog: pytest.LogCaptureFixture) -> None:
    telemetry = setup_telemetry("switchyard-test", enabled=True)
    caplog.set_level(logging.ERROR, logger="shared.errors")
    # Created after setup so that the instrumented grpc.aio factories are used on both sides.
    server = GrpcServer(service_name="probe", register=probe.register, address="127.0.0.1:0", grace_s=0)
    async with server:
        async with insecure_channel(f"127.0.0.1:{server.bound_port}") as ch:
            with telemetry.tracer("test").start_as_current_span("client"):
                client_trace_id = current_trace_id()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await ch.unary_unary(method("Unary"))(b"bug")
                # Streams, and typed errors in the middle of them, still work through tracing.
                assert [m async for m in ch.unary_stream(method("WriterStream"))(b"ok")] == [b"0", b"1"]
                received = []
                with pytest.raises(grpc.aio.AioRpcError) as stream_info:
                    async for message in ch.unary_stream(method("Stream"))(b"invalid"):
                        received.append(message)
                assert received == [b"0", b"1"]
                assert stream_info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.code() is grpc.StatusCode.INTERNAL
    assert f"trace id {client_trace_id}" in info.value.details()
    assert any(client_trace_id in r.getMessage() for r in caplog.records)


def test_metrics_server() -> None:
    assert start_metrics_server(0) is None
    assert start_metrics_server(None) is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert start_metrics_server(port) == port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    assert "python_info" in body or "process_" in body
    with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}"):
        start_metrics_server(port)


_EXPORTING_CHILD = """
import sys
from shared.telemetry import setup_telemetry
telemetry = setup_telemetry("switchyard-export-test")
assert telemetry.exporting
with telemetry.tracer("test").start_as_current_span("exported-span"):
    pass
telemetry.shutdown(timeout_s=5)
"""


async def test_spans_exported_when_endpoint_set() -> None:
    """The OTLP path, end to end: a child process with the standard variable set reaches a collector."""
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        async def Export(self, request, context):  # type: ignore[no-untyped-def]
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    collector = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    await collector.start()
    try:
        env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _EXPORTING_CHILD, env=env, cwd=Path(__file__).resolve().parents[2],
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(child.communicate(), 20)
        assert child.returncode == 0, output.decode()
    finally:
        await collector.stop(0)
    spans = [
        (attr.value.string_value, span.name)
        for request in received
        for resource_spans in request.resource_spans
        for attr in resource_spans.resource.attributes
        if attr.key == "service.name"
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]
    assert ("switchyard-export-test", "exported-span") in spans
