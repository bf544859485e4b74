"""Speculative decoding through the services: the scheduler with `num_speculative_tokens` and a real
worker over gRPC on loopback, with async scheduling on (the default). Every stream must carry the
same tokens as without speculation, and every block must be free at the end."""

from __future__ import annotations

import asyncio
import random

from switchyard.api.v1 import generation_pb2 as api_pb
from switchyard.scheduler.v1 import scheduler_pb2 as pb

from tests.inprocess import Stack
from tests.scheduler.test_service import blocks_in_use, collect


def grounded(n: int, seed: int) -> list[list[int]]:
    """Runs of one token, after which the tiny (random) model falls into loops that prompt lookup
    predicts, and random texts repeated, where drafts are mostly rejected."""
    rng = random.Random(seed)
    out = [[t] * 16 for t in (777, 100, 5)]
    while len(out) < n:
        text = [rng.randrange(8, 4096) for _ in range(rng.randint(10, 40))]
        out.append(text + text + text[:3])
    return out


def request(i: int, prompt: list[int], sampling: api_pb.SamplingParams) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=f"r{i}", prompt_token_ids=prompt, sampling=sampling)


async def run_all(stack: Stack, batch: list[list[int]], sampling: api_pb.SamplingParams) -> list[list[int]]:
    results = await asyncio.gather(*(collect(stack.stub, request(i, p, sampling)) for i, p in enumerate(batch)))
    assert await blocks_in_use(stack.stub) == 0
    return [tokens for tokens, _, _ in results]


async def test_streams_are_identical_with_and_without_speculation(tiny_model_dir) -> None:
    batch = grounded(6, seed=1)
    greedy = api_pb.SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    seeded = api_pb.SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    async with Stack(tiny_model_dir, num_workers=1) as stack:
        plain = [await run_all(stack, batch, s) for s in (greedy, seeded)]
    async with Stack(tiny_model_dir, num_workers=1, num_speculative_tokens=4) as stack:
        spec = [await run_all(stack, batch, s) for s in (greedy, seeded)]
        [loop] = stack.fleet.loops.values()
        speculation = loop.batcher.speculation
    assert spec == plain
    assert all(len(tokens) == 30 for run in spec for tokens in run)
    assert speculation.num_accepted_tokens_total > 0
