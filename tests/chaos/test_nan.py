"""NaN isolation: a request whose logits turn NaN fails alone; its batch, and the KV blocks it
leaves behind, stay healthy.

The model is a copy of the tiny one whose embedding row for one token id is NaN, so any prompt
containing that token computes NaN hidden states, NaN K/V in its blocks, and NaN logits. It runs
in one batch with normal prompts on a single worker with a small KV pool. The scheduler hands the
blocks a failed request leaves (never published to the prefix cache) to the next allocation at
once, so the normal requests of that batch grow into them, and later rounds cycle through the
whole pool: stale NaN in a slot past a request's length must not reach attention, where a masked
slot still contributes 0 * NaN = NaN.
"""

from __future__ import annotations

import asyncio
import shutil

import grpc
import pytest
from safetensors.torch import load_file, save_file
from switchyard.api.v1 import generation_pb2 as pb

from tests.chaos.conftest import (
    assert_reference_prefix,
    greedy_request,
    hf_reference,
    metric_total,
    running_stack,
    scrape,
    stubs,
    wait_quiescent,
    wait_worker_requests_zero,
)

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

MAX_TOKENS = 24
NUM_BLOCKS = 32  # 31 usable blocks of 16 tokens: the later rounds cycle through the whole pool
NORMAL = [
    "The scheduler owns every block table.",
    "import os\nimport sys\n",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time there was a small language model",
    "x",
    "Workers are executors; they never allocate blocks.",
]
POISON_TEXT = "zebra quixotic"  # a poisoned token comes from here, early in a long prompt
ROUNDS = 3  # later rounds of fresh normal prompts, each wanting most of the pool


def later_prompts(round_index: int) -> list[str]:
    return [f"round {round_index} request {i}: " + "the cache is reused " * (2 + (i * 5 + round_index) % 9)
            for i in range(6)]


@pytest.fixture(scope="module")
def poisoned(tiny_model_dir, tmp_path_factory):
    """(model dir with one NaN embedding row, the poisoned token id, a prompt containing it, and the
    HF greedy reference of every normal prompt on that model dir)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    normal = NORMAL + [p for r in range(ROUNDS) for p in later_prompts(r)]
    clean = {t for prompt in normal for t in tokenizer.encode(prompt)} | set(tokenizer.all_special_ids)
    candidates = [t for t in tokenizer.encode(POISON_TEXT, add_special_tokens=False) if t not in clean]
    assert candidates, "every token of the poison text also occurs in a normal prompt; change POISON_TEXT"
    token_id = candidates[0]
    model_dir = tmp_path_factory.mktemp("nan") / "nan-llama"
    shutil.copytree(tiny_model_dir, model_dir)
    weights = load_file(model_dir / "model.safetensors")
    name = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[name][token_id] = float("nan")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    # The poison sits near the start of a long prompt, so every block it fills holds NaN K/V.
    prompt = POISON_TEXT + " and the tokens keep flowing" * 14
    assert token_id in tokenizer.encode(prompt)[:9], tokenizer.encode(prompt)
    references = {p: hf_reference(model_dir, tokenizer.encode(p), MAX_TOKENS) for p in normal}
    generating_it = [p for p, ref in references.items() if token_id in ref.token_ids]
    assert not generating_it, f"normal prompts would generate the poisoned token: {generating_it}"
    return model_dir, token_id, prompt, references


@pytest.fixture(scope="module")
def stack(poisoned, tmp_path_factory):
    model_dir = poisoned[0]
    with running_stack(tmp_path_factory.mktemp("nan-run"), model_dir, num_workers=1,
                       worker_args=("--num-blocks", str(NUM_BLOCKS), "--num-threads", "1")) as (_, running):
        yield running


async def generate(api, prompt, max_tokens: int = MAX_TOKENS) -> tuple[list[int], int]:
    tokens, finish = [], 0
    async for response in api.Generate(greedy_request(prompt, max_tokens), timeout=120):
        tokens.extend(response.token_ids)
        finish = response.finish_reason
    return tokens, finish


async def test_nan_logits_fail_one_request_alone(stack, poisoned) -> None:
    _, token_id, poison_prompt, references = poisoned
    async with stubs(stack) as (api, scheduler):
        # One batch: the poisoned request among normal ones.
        results = await asyncio.gather(generate(api, poison_prompt), *(generate(api, p) for p in NORMAL),
                                       return_exceptions=True)
        failure = results[0]
        assert isinstance(failure, grpc.aio.AioRpcError), f"the poisoned request did not fail: {failure!r}"
        assert failure.code() not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
        compared = 0
        for prompt, result in zip(NORMAL, results[1:]):
            assert not isinstance(result, BaseException), f"{prompt!r} failed beside the poisoned request: {result!r}"
            tokens, finish = result
            assert finish == pb.FINISH_REASON_LENGTH and len(tokens) == MAX_TOKENS, (prompt, tokens)
            compared += assert_reference_prefix(references[prompt], tokens, prompt)
        first = await wait_quiescent(scheduler)
        assert first.num_live_requests == 0 and first.workers[0].num_blocks_used == 0, first

        # Later rounds reuse every block, the poisoned request's included.
        for r in range(ROUNDS):
            prompts = later_prompts(r)
            results = await asyncio.gather(*(generate(api, p) for p in prompts), return_exceptions=True)
            for prompt, result in zip(prompts, results):
                assert not isinstance(result, BaseException), f"round {r}: {prompt!r} failed: {result!r}"
                tokens, finish = result
                assert finish == pb.FINISH_REASON_LENGTH and len(tokens) == MAX_TOKENS, (prompt, tokens)
                compared += assert_reference_prefix(references[prompt], tokens, f"round {r}: {prompt!r}")
        # The poisoned prompt fails the same way again, and again alone.
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await generate(api, poison_prompt)
        assert again.value.code() == failure.code()

        stats = await wait_quiescent(scheduler)
        held = await wait_worker_requests_zero(stack)
        worker_metrics = await scrape(stack.metrics_urls["worker-1"])
    leaked = sum(w.num_blocks_used for w in stats.workers)
    assert leaked == 0 and stats.num_live_requests == 0 and not any(held.values()), (stats, held)
    assert metric_total(worker_metrics, "switchyard_sampler_errors_total") == 2

    print(f"FIGURES: nan isolation: poisoned_token={token_id} "
          f"poisoned_status={failure.code().name} ({failure.details()!r}) normal_requests={len(NORMAL)} "
          f"later_requests={ROUNDS * 6} tokens_compared={compared} blocks_leaked={leaked}")
