"""The worker core (model runner + paged KV + sampler) against Hugging Face on the same model."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from services.worker.executor import Executor
from services.worker.model_runner import ModelRunner
from services.worker.sampler import SamplingParams
from services.worker.step import CachedRequestData, NewRequestData, StepInput
from shared.errors import InvalidArgument
from tests.reference import assert_greedy_matches, hf_greedy, hf_logprobs
from tests.worker.harness import GREEDY, Job, MiniScheduler

PROMPT_LENGTHS = [1, 2, 7, 16, 33, 64, 129, 200, 300]
MAX_TOKENS = 24


def make_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def runner(tiny_model_dir) -> ModelRunner:
    return ModelRunner(tiny_model_dir, num_blocks=256, block_size=16)


def run_jobs(runner: ModelRunner, jobs: list[Job], token_budget: int = 64) -> tuple[dict[str, Job], MiniScheduler]:
    executor = Executor(runner)
    mini = MiniScheduler(block_size=runner.block_size, num_blocks=runner.num_blocks, token_budget=token_budget)
    done = mini.run(executor.execute, jobs)
    assert executor.requests == {} or set(executor.requests) <= {j.request_id for j in jobs}
    return done, mini


def test_greedy_matches_hf_in_mixed_chunked_batches(runner: ModelRunner, tiny_model_dir) -> None:
    prompts = make_prompts(runner.spec.vocab_size, PROMPT_LENGTHS)
    # Staggered arrivals: later prompts land while earlier ones decode; the budget of 64 splits
    # the long prompts into chunks across steps.
    jobs = [Job(f"r{i}", p, MAX_TOKENS, arrival_step=2 * i) for i, p in enumerate(prompts)]
    done, mini = run_jobs(runner, jobs, token_budget=64)
    assert any(p > 0 and d > 0 for p, d in mini.batch_shapes), "no step mixed prefill and decode"
    assert done["r8"].num_prefill_steps >= 300 // 64, "the 300-token prompt was not chunked"
    compared = 0
    for i, prompt in enumerate(prompts):
        ref = hf_greedy(tiny_model_dir, prompt, MAX_TOKENS)
        compared += assert_greedy_matches(ref, done[f"r{i}"].output_token_ids, f"prompt of {len(prompt)} tokens")
    assert compared >= 0.9 * MAX_TOKENS * len(prompts), f"too many near-ties: compared only {compared} tokens"


def test_reused_blocks_do_not_change_tokens(runner: ModelRunner, tiny_model_dir) -> None:
    first, second = make_prompts(runner.spec.vocab_size, [90, 70], seed=7)
    executor = Executor(runner)
    mini = MiniScheduler(block_size=runner.block_size, num_blocks=runner.num_blocks)
    job_a = Job("a", first, 12)
    mini.run(executor.execute, [job_a])
    blocks_of_a = list(job_a.block_ids)
    job_b = Job("b", second, 12)
    mini.run(executor.execute, [job_b])
    assert set(job_b.block_ids) & set(blocks_of_a), "the second request did not reuse a freed block"
    fresh, _ = run_jobs(ModelRunner(tiny_model_dir, num_blocks=256, block_size=16), [Job("b", second, 12)])
    assert job_b.output_token_ids == fresh["b"].output_token_ids
    assert_greedy_matches(hf_greedy(tiny_model_dir, second, 12), job_b.output_token_ids, "reused blocks")


def test_seeded_sampling_is_independent_of_batch(runner: ModelRunner) -> None:
    prompt, *others = make_prompts(runner.spec.vocab_size, [20, 5, 40, 9, 77], seed=3)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    alone, _ = run_jobs(runner, [Job("x", prompt, 16, seeded)])
    crowd = [Job(f"o{i}", p, 10, SamplingParams(temperature=0.8), arrival_step=i) for i, p in enumerate(others)]
    batched, _ = run_jobs(runner, crowd + [Job("x", prompt, 16, seeded, arrival_step=1)], token_budget=32)
    assert alone["x"].output_token_ids == batched["x"].output_token_ids
    other_seed, _ = run_jobs(runner, [Job("x", prompt, 16, replace(seeded, seed=99))])
    assert other_seed["x"].output_token_ids != alone["x"].output_token_ids


def test_top_k_one_equals_greedy(runner: ModelRunner) -> None:
    prompts = make_prompts(runner.spec.vocab_size, [12, 50], seed=5)
    greedy, _ = run_jobs(runner, [Job(f"g{i}", p, 16) for i, p in enumerate(prompts)])
    top1, _ = run_jobs(runner, [Job(f"g{i}", p, 16, SamplingParams(temperature=1.5, top_k=1)) for i, p in enumerate(prompts)])
    for rid in greedy:
        assert greedy[rid].output_token_ids == top1[rid].output_token_ids


def test_logprobs_match_hf_log_softmax(runner: ModelRunner, tiny_model_dir) -> None:
    prompts = make_prompts(runner.spec.vocab_size, [10, 45, 130], seed=11)
    params = SamplingParams(temperature=0.9, seed=5, return_logprobs=True, num_logprobs=5)
    done, _ = run_jobs(runner, [Job(f"l{i}", p, 10, params, arrival_step=i) for i, p in enumerate(prompts)], token_budget=48)
    for i, prompt in enumerate(prompts):
        job = done[f"l{i}"]
        expected = hf_logprobs(tiny_model_dir, prompt, job.output_token_ids)
        for pos, (token, lp) in enumerate(zip(job.output_token_ids, job.logprobs)):
            assert abs(lp.logprob - float(expected[pos, token])) < 1e-4
            top = expected[pos].topk(5)
            assert list(lp.top_token_ids) == top.indices.tolist()
            assert torch.allclose(torch.tensor(lp.top_logprobs), top.values, atol=1e-4)


def test_bad_steps_are_refused_whole(runner: ModelRunner) -> None:
    executor = Executor(runner)
    good = NewRequestData("ok", (5, 6, 7), (), GREEDY, (1,), 0, 3)
    executor.execute(StepInput(0, (good,)))
    held = dict(executor.requests)
    cases = {
        "block_ids": NewRequestData("b", (5,), (), GREEDY, (runner.num_blocks,), 0, 1),
        "prompt_token_ids": NewRequestData("v", (runner.spec.vocab_size,), (), GREEDY, (2,), 0, 1),
        "num_scheduled_tokens": NewRequestData("n", (5, 6), (), GREEDY, (2,), 0, 3),
    }
    for field_name, bad in cases.items():
        with pytest.raises(InvalidArgument, match=field_name):
            executor.execute(StepInput(1, (bad,), (CachedRequestData("ok", (), 1, 3),)))
        assert executor.requests.keys() == held.keys() and executor.requests["ok"].num_computed_tokens == 3
    with pytest.raises(InvalidArgument, match="not held"):
        executor.execute(StepInput(2, (), (CachedRequestData("ghost", (), 1, 0),)))
    with pytest.raises(InvalidArgument, match="num_computed_tokens"):
        executor.execute(StepInput(3, (), (CachedRequestData("ok", (), 1, 2),)))


def test_a_prefix_copied_through_the_host_tier_decodes_like_a_fresh_prefill(tiny_model_dir) -> None:
    """Request a fills blocks 1-2; a step copies them down to host blocks 3-4 and a later one up
    into device blocks 5-6 (as the scheduler does after evicting them), and request b starts
    there with 32 tokens computed: its greedy tokens equal a's, computed from scratch."""
    runner = ModelRunner(tiny_model_dir, num_blocks=16, block_size=16, kv_host_cache_bytes=8 * 2**20)
    assert runner.kv_pool.num_host_blocks > 4
    executor = Executor(runner)
    [prompt] = make_prompts(runner.spec.vocab_size, [33])

    def decode(rid: str, block_ids: tuple[int, ...], num_computed: int, steps: int, **copies) -> list[int]:
        new = NewRequestData(rid, tuple(prompt), (), GREEDY, block_ids, num_computed, len(prompt) - num_computed)
        [out] = executor.execute(StepInput(0, (new,), **copies)).outputs
        tokens = list(out.token_ids)
        for _ in range(steps):
            computed = len(prompt) + len(tokens) - 1
            [out] = executor.execute(StepInput(0, (), (CachedRequestData(rid, (), 1, computed),))).outputs
            tokens += out.token_ids
        return tokens

    expected = decode("a", (1, 2, 3), 0, 5)
    executor.execute(StepInput(0, finished_request_ids=("a",), copies_to_host=((1, 3), (2, 4))))
    runner.kv_pool.clear_blocks([1, 2])  # the device copies are gone (reused by someone else)
    assert decode("b", (5, 6, 7), 32, 5, copies_to_device=((3, 5), (4, 6))) == expected
    with pytest.raises(InvalidArgument, match="copies_to_device"):  # refused whole: b untouched
        executor.execute(StepInput(0, (), (CachedRequestData("b", (), 1, 38),),
                                   copies_to_device=((3, runner.num_blocks),)))
    assert executor.requests["b"].num_computed_tokens == 38
