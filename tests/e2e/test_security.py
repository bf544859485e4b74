"""Security on the real stack: mutual TLS on every listener and internal hop, API keys on gRPC and
HTTP, per-key rate limits, and no secret in logs, traces or metrics.

One stack, started the way `make up` does, with a generated CA: every process presents a
certificate that CA signed and accepts only peers that present one too.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import grpc
import grpc.aio
import httpx
import pytest
from switchyard.api.v1 import generation_pb2 as pb
from switchyard.api.v1 import generation_pb2_grpc

from deploy.stack import HEALTH_NAMES, check_health, process_health
from shared.channel import open_channel
from shared.tls import TlsConfig
from tests.deploy.test_stack import make_config
from tests.otlp import stack_with_collector
from tests.reference import assert_greedy_matches, hf_greedy
from tests.security.certs import CertificateAuthority, Identity

pytestmark = pytest.mark.e2e

ALICE = "sk-alice-5f1c9e0a7b3d"
BOB = "sk-bob-8e2d4c6a0f1b"
RATE_PER_S, BURST = 0.2, 6  # one request per 5 s refills: nothing refills during the test


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Identity]:
    directory = tmp_path_factory.mktemp("pki")
    ours, theirs = CertificateAuthority(directory, "ours"), CertificateAuthority(directory, "theirs")
    return {"service": ours.issue("service"), "client": ours.issue("client"), "stranger": theirs.issue("client")}


@pytest.fixture(scope="module")
def secure(tiny_model_dir, tmp_path_factory, pki):
    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "keys").write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    config = make_config(run_dir, tiny_model_dir, services=("worker", "scheduler", "tokenizer"), num_workers=1,
                         tls=pki["service"].tls(),
                         tokenizer_args=("--api-keys-file", str(run_dir / "keys"), "--rate-limit-per-s",
                                         str(RATE_PER_S), "--rate-limit-burst", str(BURST)))
    with stack_with_collector(config) as running:
        yield running


def greedy(prompt: str, max_tokens: int = 12) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                         ignore_eos=True))


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


async def generate(channel: grpc.aio.Channel, request: pb.GenerateRequest, metadata=()) -> list[int]:
    stub = generation_pb2_grpc.GenerationStub(channel)
    return [t async for r in stub.Generate(request, metadata=metadata, timeout=60) for t in r.token_ids]


def client_context(identity: Identity | None, ca_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    if identity is not None:
        context.load_cert_chain(identity.cert_file, identity.key_file)
    return context


async def test_front_door_needs_our_certificate_and_a_key(secure, pki, tiny_model_dir) -> None:
    stack, _ = secure
    from transformers import AutoTokenizer  # noqa: PLC0415

    prompt = "Mutual TLS all the way down"
    async with open_channel(stack.tokenizer_address, pki["client"].tls()) as channel:
        ids = await generate(channel, greedy(prompt), bearer(ALICE))
        expected = hf_greedy(tiny_model_dir, AutoTokenizer.from_pretrained(tiny_model_dir).encode(prompt), 12)
        assert_greedy_matches(expected, ids, prompt)
        for metadata in ((), bearer("sk-mallory-000000000"), (("authorization", ALICE),)):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await generate(channel, greedy(prompt), metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    refused = {"plaintext": grpc.aio.insecure_channel(stack.tokenizer_address),
               "another CA": open_channel(stack.tokenizer_address, TlsConfig(
                   pki["stranger"].cert_file, pki["stranger"].key_file, pki["client"].ca_file))}
    for why, channel in refused.items():
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await generate(channel, greedy(prompt), bearer(ALICE))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, why


def test_http_needs_our_certificate_and_a_key(secure, pki) -> None:
    stack, _ = secure
    url = stack.http_url.replace("http://", "https://") + "/v1/completions"
    body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 4, "temperature": 0}
    good = client_context(pki["client"], pki["client"].ca_file)
    ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {ALICE}"}, verify=good, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    for headers in ({}, {"Authorization": "Bearer sk-mallory-000000000"}):
        refused = httpx.post(url, json=body, headers=headers, verify=good, timeout=60)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url.replace("/v1/completions", "/health"), verify=good, timeout=10).status_code == 200
    stranger = client_context(pki["stranger"], pki["client"].ca_file)
    for why, kwargs in (("plaintext", {"url": url.replace("https://", "http://")}),
                        ("no certificate", {"verify": client_context(None, pki["client"].ca_file)}),
                        ("another CA", {"verify": stranger})):
        with pytest.raises(httpx.TransportError):
            httpx.post(**{"url": url, "json": body, "headers": {"Authorization": f"Bearer {ALICE}"},
                          "timeout": 10, **kwargs})
            pytest.fail(f"{why} was served")


def test_internal_listeners_refuse_plaintext_and_strangers(secure, pki) -> None:
    stack, _ = secure
    good, stranger = pki["client"].tls(), TlsConfig(pki["stranger"].cert_file, pki["stranger"].key_file,
                                                   pki["client"].ca_file)
    for process in stack.processes:
        service = HEALTH_NAMES[process.kind]
        assert process_health(process, tls=good) in ("SERVING", "STANDBY"), process.name  # scheduler-2 stands by
        assert check_health(process.address, service) == "UNREACHABLE", process.name
        assert check_health(process.address, service, tls=stranger) == "UNREACHABLE", process.name
    for name, url in stack.metrics_urls.items():
        https = url.replace("http://", "https://")
        assert httpx.get(https, verify=client_context(pki["client"], pki["client"].ca_file), timeout=10).status_code == 200
        with pytest.raises(httpx.TransportError):
            httpx.get(https, verify=client_context(pki["stranger"], pki["client"].ca_file), timeout=10)
            pytest.fail(f"{name} metrics served another CA's client")


async def test_rate_limit_per_key_with_retry_hints(secure, pki) -> None:
    stack, _ = secure
    async with open_channel(stack.tokenizer_address, pki["client"].tls()) as channel:
        async def one(secret: str) -> grpc.StatusCode | None:
            try:
                await generate(channel, greedy("rate", 1), bearer(secret))
                return None
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert int(dict(e.trailing_metadata())["retry-after-ms"]) > 0
                return e.code()

        codes = await asyncio.gather(*(one(BOB) for _ in range(3 * BURST)))
        assert codes.count(None) == BURST  # the burst; at 0.2/s nothing refills meanwhile
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= BURST  # the rest is refused
        assert set(codes) <= {None, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert await one(ALICE) is None  # another key's bucket is untouched
    good = client_context(pki["client"], pki["client"].ca_file)
    url = stack.http_url.replace("http://", "https://") + "/v1/completions"
    limited = httpx.post(url, json={"model": "tiny-llama", "prompt": "x", "max_tokens": 1},
                         headers={"Authorization": f"Bearer {BOB}"}, verify=good, timeout=30)
    assert limited.status_code == 429 and float(limited.headers["retry-after"]) > 0


def test_no_secret_in_logs_traces_or_metrics(secure, pki) -> None:
    """Runs last in this module: by now both keys were used, refused and rate limited."""
    stack, collector = secure
    good = client_context(pki["client"], pki["client"].ca_file)
    texts = {name: httpx.get(url.replace("http://", "https://"), verify=good, timeout=10).text
             for name, url in stack.metrics_urls.items()}
    texts.update({p.name + ".log": Path(p.log).read_text(errors="replace") for p in stack.processes})
    assert "switchyard_" in texts["tokenizer"] and any("serving on" in t for t in texts.values())
    time.sleep(1.0)  # the batch span processor exports every 200 ms
    spans = collector.serialized()
    assert spans, "no span reached the collector: the trace check would be vacuous"
    for secret in (ALICE, BOB, "sk-mallory-000000000"):
        for name, text in texts.items():
            assert secret not in text, f"{secret[:6]}... appears in {name}"
        assert not any(secret.encode() in span for span in spans), f"{secret[:6]}... appears in a span"
