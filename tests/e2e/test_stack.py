"""End to end: the stack as separate processes, started exactly the way `make up` starts it."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import openai
import pytest
from switchyard.api.v1 import generation_pb2 as pb
from switchyard.api.v1 import generation_pb2_grpc
from switchyard.scheduler.v1 import scheduler_pb2 as sched_pb
from switchyard.scheduler.v1 import scheduler_pb2_grpc

from deploy.stack import start_stack, stop_stack
from tests.deploy.test_stack import make_config
from tests.reference import assert_greedy_matches, hf_greedy

pytestmark = pytest.mark.e2e

PROMPTS = ["The scheduler owns every block table.", "import os\nimport sys\n", "Ünïcödé 東京 🚀", "x"]


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("run"), tiny_model_dir,
                         services=("worker", "scheduler", "tokenizer"))
    running = start_stack(config)
    try:
        yield running
    finally:
        stop_stack(config.run_dir, quiet=True)


@pytest.fixture(scope="module")
async def api(stack):
    async with grpc.aio.insecure_channel(stack.tokenizer_address) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


@pytest.fixture(scope="module")
async def scheduler(stack):
    async with grpc.aio.insecure_channel(stack.scheduler_address) as channel:
        yield scheduler_pb2_grpc.SchedulerStub(channel)


def greedy(prompt: str, max_tokens: int = 24, **sampling) -> pb.GenerateRequest:
    sampling = {"temperature": 0.0, "ignore_eos": True, **sampling}
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens, **sampling))


async def run(api, request: pb.GenerateRequest) -> tuple[str, list[int], pb.GenerateResponse]:
    responses = [r async for r in api.Generate(request, timeout=120)]
    return "".join(r.text for r in responses), [t for r in responses for t in r.token_ids], responses[-1]


async def blocks_in_use(scheduler) -> tuple[int, int]:
    stats = await scheduler.GetStats(sched_pb.GetStatsRequest(), timeout=5)
    for worker in stats.workers:
        assert worker.num_blocks_used + worker.num_blocks_cached + worker.num_blocks_free == worker.num_blocks_total
    return sum(w.num_blocks_used for w in stats.workers), stats.num_live_requests


async def test_greedy_tokens_match_hf_and_http_returns_same_text(stack, api, tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    client = openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="unused")
    for prompt in PROMPTS:
        text, ids, last = await run(api, greedy(prompt))
        assert_greedy_matches(hf_greedy(tiny_model_dir, tokenizer.encode(prompt), 24), ids, prompt)
        assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == 24
        completion = await client.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
        assert completion.choices[0].text == text
        chunks = [c async for c in await client.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=24, temperature=0, stream=True,
            extra_body={"ignore_eos": True})]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    await client.close()


async def test_64_concurrent_streams_complete(api, scheduler) -> None:
    results = await asyncio.gather(*(run(api, greedy(f"stream {i} " * (1 + i % 7), max_tokens=16)) for i in range(64)))
    assert all(len(ids) == 16 and last.finish_reason == pb.FINISH_REASON_LENGTH for _, ids, last in results)
    assert await blocks_in_use(scheduler) == (0, 0)


async def test_client_cancel_leaves_zero_blocks_in_use(api, scheduler) -> None:
    calls = [api.Generate(greedy(f"cancel {i} " * 30, max_tokens=1500)) for i in range(4)]
    for call in calls:
        async for response in call:
            if response.token_ids:
                break
    used, live = await blocks_in_use(scheduler)
    assert used > 0 and live == 4
    for call in calls:
        call.cancel()
    for _ in range(100):
        if await blocks_in_use(scheduler) == (0, 0):
            break
        await asyncio.sleep(0.05)
    assert await blocks_in_use(scheduler) == (0, 0)


GRPC_BAD = {
    "prompt": pb.GenerateRequest(prompt=""),
    "sampling.temperature": greedy("hi", temperature=-1.0),
    "sampling.top_p": greedy("hi", top_p=0.0),
    "sampling.top_k": greedy("hi", top_k=-3),
    "sampling.max_tokens": greedy("hi", max_tokens=0),
    "prompt_token_ids": pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, 4096])),
}


@pytest.mark.parametrize("field", list(GRPC_BAD))
async def test_bad_grpc_input_names_the_field(api, field) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await run(api, GRPC_BAD[field])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()


async def test_over_length_and_oversize_requests(api) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await run(api, greedy("hello", max_tokens=4000))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await run(api, greedy("y" * (2 << 20)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request" in err.value.details()


HTTP_BAD = {
    "temperature": {"temperature": -1},
    "top_p": {"top_p": 1.5},
    "max_tokens": {"max_tokens": 0},
    "prompt": {"prompt": ""},
    "model": {"model": "no-such-model"},
}


@pytest.mark.parametrize("field", list(HTTP_BAD))
async def test_bad_http_input_is_400_naming_the_field(stack, field) -> None:
    body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 4, **HTTP_BAD[field]}
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=30) as client:
        response = await client.post("/v1/completions", json=body)
    assert response.status_code in (400, 404)
    error = response.json()["error"]
    assert field in (error.get("param") or "") or field in error["message"]
