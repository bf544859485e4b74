"""TLS and mutual TLS on each kind of listener (gRPC, HTTP, /metrics) with a generated CA, in process.

Every refusal is checked with a client that would otherwise succeed: a plaintext client, a client
with no certificate, and a client whose certificate another CA signed.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import httpx
import pytest
from fastapi import FastAPI

from services.tokenizer.http_api import serve_http
from shared.auth import ApiKeys, Gate, GateInterceptor
from shared.channel import open_channel
from shared.errors import InvalidArgument
from shared.rate_limit import RateLimiter
from shared.server import GrpcServer
from shared.telemetry import start_metrics_server
from shared.tls import TlsConfig
from tests.security.certs import CertificateAuthority, Identity
from tests.shared.conftest import Probe, method


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    directory = tmp_path_factory.mktemp("pki")
    ours, theirs = CertificateAuthority(directory, "ours"), CertificateAuthority(directory, "theirs")
    return {"server": ours.issue("server"), "client": ours.issue("client"), "stranger": theirs.issue("client")}


async def call(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    return await channel.unary_unary(method("Unary"))(b"ok", timeout=5, metadata=metadata)


@pytest.fixture
async def mtls_server(pki: dict[str, Identity]) -> AsyncIterator[GrpcServer]:
    async with GrpcServer(service_name="probe", register=Probe().register, address="127.0.0.1:0", grace_s=0.2,
                          tls=pki["server"].tls()) as server:
        yield server


async def test_grpc_mutual_tls_admits_only_clients_of_its_ca(mtls_server: GrpcServer,
                                                             pki: dict[str, Identity]) -> None:
    address = mtls_server.target
    async with open_channel(address, pki["client"].tls()) as channel:
        assert await call(channel) == b"ok"
    refused = {
        "plaintext": grpc.aio.insecure_channel(address),
        "no client certificate": grpc.aio.secure_channel(
            address, grpc.ssl_channel_credentials(Path(pki["client"].ca_file).read_bytes())),
        "another CA's client": open_channel(address, TlsConfig(pki["stranger"].cert_file, pki["stranger"].key_file,
                                                                pki["client"].ca_file)),
    }
    for why, channel in refused.items():
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(channel)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, why


async def test_grpc_client_refuses_a_server_its_ca_did_not_sign(pki: dict[str, Identity]) -> None:
    async with GrpcServer(service_name="probe", register=Probe().register, address="127.0.0.1:0", grace_s=0.2,
                          tls=TlsConfig(pki["stranger"].cert_file, pki["stranger"].key_file)) as server:
        async with open_channel(server.target, pki["client"].tls()) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(channel)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_grpc_gate_wants_a_key_limits_its_rate_and_leaves_health_open(pki: dict[str, Identity],
                                                                           tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("alice:sk-alice-0123456789\n")
    gate = Gate(ApiKeys.from_file(str(tmp_path / "keys")), RateLimiter(rate_per_s=0.5, burst=2))
    async with GrpcServer(service_name="probe", register=Probe().register, address="127.0.0.1:0", grace_s=0.2,
                          interceptors=[GateInterceptor(gate)]) as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            for metadata in ((), (("authorization", "Bearer sk-wrong-0000000"),)):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call(channel, metadata)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "sk-" not in (e.value.details() or "")
            key = (("authorization", "Bearer sk-alice-0123456789"),)
            assert await call(channel, key) == b"ok"
            assert await call(channel, key) == b"ok"
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(channel, key)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            hint = dict(e.value.trailing_metadata() or ())
            assert 0 < int(hint["retry-after-ms"]) <= 2000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _https_refusals(url: str, pki: dict[str, Identity]) -> None:
    """The same request from the good client succeeds and from each bad one fails."""
    good = ssl.create_default_context(cafile=pki["client"].ca_file)
    good.load_cert_chain(pki["client"].cert_file, pki["client"].key_file)
    assert httpx.get(url, verify=good, timeout=5).status_code == 200
    no_cert = ssl.create_default_context(cafile=pki["client"].ca_file)
    stranger = ssl.create_default_context(cafile=pki["client"].ca_file)
    stranger.load_cert_chain(pki["stranger"].cert_file, pki["stranger"].key_file)
    for why, context in (("no client certificate", no_cert), ("another CA's client", stranger)):
        with pytest.raises((httpx.TransportError, ssl.SSLError)):
            httpx.get(url, verify=context, timeout=5).raise_for_status()
            pytest.fail(f"{why} was served")
    with pytest.raises(httpx.TransportError):
        httpx.get(url.replace("https://", "http://"), timeout=5)


def test_metrics_listener_serves_only_mutual_tls_clients(pki: dict[str, Identity]) -> None:
    port = start_metrics_server(_free_port(), "127.0.0.1", pki["server"].tls())
    _https_refusals(f"https://127.0.0.1:{port}/metrics", pki)


async def test_http_api_listener_serves_only_mutual_tls_clients(pki: dict[str, Identity]) -> None:
    import asyncio  # noqa: PLC0415

    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    server = await serve_http(app, "127.0.0.1", 0, grace_s=0.2, tls=pki["server"].tls())
    try:
        await asyncio.to_thread(_https_refusals, f"https://127.0.0.1:{server.port}/health", pki)
    finally:
        await server.stop()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"cert_file": "x.pem"}, "tls_key"),
    ({"key_file": "x.key"}, "tls_key"),
    ({"ca_file": "ca.pem"}, "tls_cert"),
    ({"cert_file": "/nonexistent.pem", "key_file": "/nonexistent.key"}, "tls_cert"),
])
def test_tls_settings_name_the_field(kwargs: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        TlsConfig(**kwargs)
    assert e.value.field == field
