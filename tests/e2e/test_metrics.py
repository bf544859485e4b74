"""End to end: after a known workload, every service's /metrics adds up to what the clients saw.

The stack runs as separate processes (as `make up` starts it), so each service serves its own
registry; the counters are checked against the workload, summed across workers where a metric is
per worker, which also shows that no metric is counted by two processes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from switchyard.api.v1 import generation_pb2 as pb
from switchyard.api.v1 import generation_pb2_grpc
from switchyard.worker.v1 import worker_pb2 as worker_pb
from switchyard.worker.v1 import worker_pb2_grpc

from deploy.stack import Stack, start_stack, stop_stack
from tests.deploy.test_stack import make_config

pytestmark = pytest.mark.e2e

MAX_TOKENS = 8
SHORT_PROMPTS = [f"request {i}: the quick brown fox jumps over the lazy dog" * (1 + i % 3) for i in range(6)]
LONG_PROMPT = "The scheduler owns every KV block table, and a worker is an executor. " * 12
HTTP_PROMPT = "def add(a, b):"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory) -> Iterator[Stack]:
    config = make_config(tmp_path_factory.mktemp("run"), tiny_model_dir,
                         services=("worker", "scheduler", "tokenizer"))
    running = start_stack(config)
    try:
        yield running
    finally:
        stop_stack(config.run_dir, quiet=True)


def greedy(prompt: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))


async def generate(api, request: pb.GenerateRequest) -> tuple[int, int]:
    """(prompt tokens, tokens streamed) of one successful call."""
    responses = [r async for r in api.Generate(request, timeout=60)]
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    return responses[-1].usage.prompt_tokens, sum(len(r.token_ids) for r in responses)


async def scrape(stack: Stack) -> dict[str, Samples]:
    """Every process's samples, keyed by process name, then (sample name, labels)."""
    scraped = {}
    async with httpx.AsyncClient(timeout=10) as client:
        for name, url in stack.metrics_urls.items():
            text = (await client.get(url)).text
            scraped[name] = {(s.name, frozenset(s.labels.items())): s.value
                             for family in text_string_to_metric_families(text) for s in family.samples}
    return scraped


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of `name` over every series whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def settled(stack: Stack, num_requests: int) -> dict[str, Samples]:
    """Scrapes until the stack is idle: the last stream's bookkeeping trails the client's last byte."""
    deadline = time.monotonic() + 15
    while True:
        scraped = await scrape(stack)
        workers = [s for name, s in scraped.items() if name.startswith("worker")]
        idle = (total(scraped["scheduler"], "switchyard_requests_total") == num_requests
                and total(scraped["scheduler"], "switchyard_kv_blocks_used_ratio") == 0
                and total(scraped["tokenizer"], "switchyard_frontend_requests_in_flight") == 0
                and all(total(w, "switchyard_worker_requests") == 0 for w in workers))
        if idle or time.monotonic() > deadline:
            return scraped
        await asyncio.sleep(0.1)


async def test_metrics_add_up_to_the_workload(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.tokenizer_address) as channel:
        api = generation_pb2_grpc.GenerationStub(channel)
        short = await asyncio.gather(*(generate(api, greedy(p)) for p in SHORT_PROMPTS))
        long_first = await generate(api, greedy(LONG_PROMPT))
        long_again = await generate(api, greedy(LONG_PROMPT))  # its prefix is now cached
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await generate(api, pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=-1.0)))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=60) as client:
        response = await client.post("/v1/completions", json={
            "model": "tiny-llama", "prompt": HTTP_PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True})
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    calls = [*short, long_first, long_again, (usage["prompt_tokens"], usage["completion_tokens"])]
    num_ok = len(calls)
    num_prompt_tokens = sum(p for p, _ in calls)
    num_streamed = sum(n for _, n in calls)
    assert num_streamed == num_ok * MAX_TOKENS
    async with grpc.aio.insecure_channel(stack.worker_addresses[0]) as channel:
        block_size = (await worker_pb2_grpc.WorkerStub(channel).Info(worker_pb.InfoRequest(), timeout=5)).block_size

    scraped = await settled(stack, num_ok)
    sched, front = scraped["scheduler"], scraped["tokenizer"]
    workers = [s for name, s in scraped.items() if name.startswith("worker")]
    assert len(workers) == 2

    # Tokens and requests, as the scheduler counted them, equal what the clients received.
    assert total(sched, "switchyard_generation_tokens_total") == num_streamed
    assert total(sched, "switchyard_prompt_tokens_total") == num_prompt_tokens
    finished = {reason: total(sched, "switchyard_requests_total", finish_reason=reason)
                for reason in ("stop", "length", "abort", "error")}
    assert finished == {"stop": 0, "length": num_ok, "abort": 0, "error": 0}
    assert total(sched, "switchyard_time_to_first_token_seconds_count") == num_ok
    assert total(sched, "switchyard_e2e_request_latency_seconds_count") == num_ok
    assert total(sched, "switchyard_request_queue_time_seconds_count") == num_ok
    # One ITL observation per token after the first, however tokens were grouped into deliveries.
    assert total(sched, "switchyard_inter_token_latency_seconds_count") == num_streamed - num_ok
    assert total(sched, "switchyard_routing_decisions_total") == num_ok

    # The repeated long prompt found all its full blocks but the last token's in the prefix cache.
    long_len = long_first[0]
    hits = total(sched, "switchyard_prefix_cache_hits_total")
    assert hits >= long_len - block_size
    assert total(sched, "switchyard_prefix_cache_queries_total") == num_prompt_tokens

    # Front door: one refused call, the rest OK, split by API.
    assert total(front, "switchyard_frontend_requests_total", code="INVALID_ARGUMENT") == 1
    assert total(front, "switchyard_frontend_requests_total", api="grpc", code="OK") == num_ok - 1
    assert total(front, "switchyard_frontend_requests_total", api="http", code="OK") == 1
    assert total(front, "switchyard_frontend_requests_total") == num_ok + 1
    assert total(front, "switchyard_frontend_finish_reasons_total", finish_reason="length") == num_ok
    assert total(front, "switchyard_frontend_time_to_first_token_seconds_count") == num_ok
    assert total(front, "switchyard_frontend_request_latency_seconds_count") == num_ok + 1
    assert total(front, "switchyard_frontend_tokenize_duration_seconds_count") >= num_ok

    # Workers computed every token the requests needed: prompts less cache hits, and every
    # generated token but the last (which is sampled, never fed back).
    assert sum(total(w, "switchyard_step_duration_seconds_count") for w in workers) > 0
    assert sum(total(w, "switchyard_step_batch_size_count") for w in workers) > 0
    prefill = sum(total(w, "switchyard_step_prefill_tokens_total") for w in workers)
    decode = sum(total(w, "switchyard_step_decode_tokens_total") for w in workers)
    needed_prefill, needed_decode = num_prompt_tokens - hits, num_streamed - num_ok
    assert prefill + decode >= needed_prefill + needed_decode
    if total(sched, "switchyard_preemptions_total") == 0:  # nothing was recomputed
        assert (prefill, decode) == (needed_prefill, needed_decode)
    assert sum(total(w, "switchyard_sampler_errors_total") for w in workers) == 0

    # Idle again: no blocks in use, nothing running or held, every worker up.
    for worker_address in stack.worker_addresses:
        assert total(sched, "switchyard_worker_up", worker=worker_address) == 1
        assert total(sched, "switchyard_kv_blocks_used_ratio", worker=worker_address) == 0
    assert total(sched, "switchyard_requests_running") == total(sched, "switchyard_requests_waiting") == 0
    assert total(sched, "switchyard_pool_weight") > 0
    for w in workers:
        assert total(w, "switchyard_worker_requests") == 0
        assert total(w, "switchyard_worker_kv_blocks") == 128  # WORKER_ARGS --num-blocks
    assert total(front, "switchyard_frontend_requests_in_flight") == 0
