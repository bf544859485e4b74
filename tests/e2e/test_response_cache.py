"""End to end: the front door's response cache on the stack as separate processes (as `make up`
starts it), turned on by its flags, with API keys: a repeat is a hit with the same answer over
gRPC and HTTP (streamed or not), anything that may change the answer is a miss, clients can bypass
it, and /metrics counts it. TTL expiry and canary rollbacks, which need a clock to move or weights
to change, are in tests/tokenizer/test_response_cache_stack.py."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from switchyard.api.v1 import generation_pb2 as pb
from switchyard.api.v1 import generation_pb2_grpc

from deploy.stack import Stack, start_stack, stop_stack
from tests.deploy.test_stack import make_config

pytestmark = pytest.mark.e2e

ALICE, BOB = "sk-alice-5f1c9e0a7b3d", "sk-bob-8e2d4c6a0f1b"


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "keys").write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    config = make_config(run_dir, tiny_model_dir, services=("worker", "scheduler", "tokenizer"), num_workers=1,
                         tokenizer_args=("--api-keys-file", str(run_dir / "keys"), "--response-cache-mib", "8",
                                         "--response-cache-ttl-s", "3600"))
    running = start_stack(config)
    try:
        yield running
    finally:
        stop_stack(config.run_dir, quiet=True)


@pytest.fixture(scope="module")
async def api(stack):
    async with grpc.aio.insecure_channel(stack.tokenizer_address) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


def request(prompt: str, salt: str = "", **sampling) -> pb.GenerateRequest:
    sampling = {"max_tokens": 10, "temperature": 0.0, "ignore_eos": True, "logprobs": 2, **sampling}
    return pb.GenerateRequest(prompt=prompt, cache_salt=salt, sampling=pb.SamplingParams(**sampling))


async def generate(api, req: pb.GenerateRequest, key: str = ALICE,
                   cache_control: str | None = None) -> tuple[str, list[pb.GenerateResponse]]:
    """The cache mark (initial metadata) and the responses, request ids cleared."""
    metadata = [("authorization", f"Bearer {key}")]
    if cache_control is not None:
        metadata.append(("x-switchyard-cache-control", cache_control))
    call = api.Generate(req, metadata=metadata, timeout=120)
    mark = dict(await call.initial_metadata()).get("x-switchyard-cache", "")
    responses = [r async for r in call]
    for r in responses:
        r.ClearField("request_id")
    return mark, responses


async def test_a_repeated_greedy_request_is_a_hit_with_the_same_answer(api) -> None:
    req = request("The scheduler owns every block table.")
    mark, first = await generate(api, req)
    assert mark == "miss" and first[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(len(r.token_ids) for r in first) == 10 and all(len(r.logprobs) == len(r.token_ids) for r in first)
    for _ in range(2):
        mark, again = await generate(api, req)
        assert mark == "hit" and again == first  # text, ids, logprobs, finish reason, usage, message by message


async def test_anything_that_may_change_the_answer_is_a_miss(api) -> None:
    prompt = "import os\nimport sys\n"
    assert (await generate(api, request(prompt)))[0] == "miss"
    assert (await generate(api, request(prompt)))[0] == "hit"
    for name, (req, key) in {
        "another salt": (request(prompt, salt="tenant-b"), ALICE),
        "another API key": (request(prompt), BOB),
        "another max_tokens": (request(prompt, max_tokens=9), ALICE),
        "logprobs": (request(prompt, logprobs=3), ALICE),
        "a stop string": (request(prompt, stop=["zz"]), ALICE),
        "a seed": (request(prompt, seed=1), ALICE),
        "a prompt one character longer": (request(prompt + " "), ALICE),
    }.items():
        assert (await generate(api, req, key))[0] == "miss", name
    # Seeded sampling is deterministic too: the same seed hits, another seed misses.
    seeded = request(prompt, temperature=0.9, seed=42)
    mark, first = await generate(api, seeded)
    assert mark == "miss"
    mark, again = await generate(api, seeded)
    assert mark == "hit" and again == first
    assert (await generate(api, request(prompt, temperature=0.9, seed=43)))[0] == "miss"
    # Sampling without a seed is never cached.
    for _ in range(2):
        assert (await generate(api, request(prompt, temperature=0.9)))[0] == "uncacheable"


async def test_clients_can_bypass_the_cache(api) -> None:
    req = request("bypass me, please")
    assert (await generate(api, req, cache_control="no-store"))[0] == "bypass"
    assert (await generate(api, req))[0] == "miss"  # no-store stored nothing
    mark, fresh = await generate(api, req, cache_control="no-cache")
    assert mark == "bypass"
    mark, cached = await generate(api, req)
    assert mark == "hit" and cached == fresh  # no-cache answered afresh and stored it


def _sse_payloads(body: str) -> list[dict]:
    """The events of an SSE body without what differs per response (its id and time)."""
    events = []
    for block in body.split("\n\n"):
        if block.startswith("data: {"):
            payload = json.loads(block.removeprefix("data: "))
            payload.pop("id", None)
            payload.pop("created", None)
            events.append(payload)
    return events


async def test_http_hits_are_marked_and_stream_the_same_events(stack) -> None:
    body = {"model": "tiny-llama", "prompt": "Ünïcödé 東京 🚀", "max_tokens": 12, "temperature": 0, "logprobs": 2,
            "ignore_eos": True}
    headers = {"authorization": f"Bearer {ALICE}"}
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=120, headers=headers) as client:
        streamed = []
        for expected in ("miss", "hit", "hit"):
            response = await client.post("/v1/completions", json={**body, "stream": True,
                                                                  "stream_options": {"include_usage": True}})
            assert response.status_code == 200 and response.headers["x-switchyard-cache"] == expected
            streamed.append(_sse_payloads(response.text))
        assert streamed[1] == streamed[0] and streamed[2] == streamed[0]  # the same events as the miss
        whole = await client.post("/v1/completions", json=body)  # the same request, not streamed: one entry
        assert whole.headers["x-switchyard-cache"] == "hit"
        text = "".join(e["choices"][0]["text"] for e in streamed[0] if e["choices"])
        assert whole.json()["choices"][0]["text"] == text and whole.json()["usage"]["completion_tokens"] == 12
        bypassed = await client.post("/v1/completions", json=body, headers={"cache-control": "no-cache"})
        assert bypassed.headers["x-switchyard-cache"] == "bypass"
        assert bypassed.json()["choices"][0]["text"] == text
        chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                "temperature": 0}
        marks = [(await client.post("/v1/chat/completions", json=chat)).headers["x-switchyard-cache"]
                 for _ in range(2)]
        assert marks == ["miss", "hit"]
        other_tenant = await client.post("/v1/chat/completions", json=chat,
                                         headers={"authorization": f"Bearer {BOB}"})
        assert other_tenant.headers["x-switchyard-cache"] == "miss"


async def test_metrics_count_hits_misses_and_bytes(stack, api) -> None:
    async def samples() -> dict[str, float]:
        async with httpx.AsyncClient(timeout=10) as client:
            text = (await client.get(stack.metrics_urls["tokenizer"])).text
        return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
                if s.name.startswith("switchyard_frontend_response_cache")}

    before = await samples()
    req = request("count me in the metrics")
    await generate(api, req)
    await generate(api, req)
    await generate(api, req, cache_control="no-cache")
    after = await samples()
    assert after["switchyard_frontend_response_cache_misses_total"] - before[
        "switchyard_frontend_response_cache_misses_total"] == 1
    assert after["switchyard_frontend_response_cache_hits_total"] - before[
        "switchyard_frontend_response_cache_hits_total"] == 1
    assert 0 < after["switchyard_frontend_response_cache_bytes"] <= after[
        "switchyard_frontend_response_cache_capacity_bytes"] == 8 << 20
    assert after["switchyard_frontend_response_cache_entries"] >= 1
