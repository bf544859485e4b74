"""Speculative decoding end to end in one process: the scheduler's Batcher (proposing drafts) drives
the worker's Executor (verifying them) through both wire conversions, without gRPC. Output with
speculation must be token-identical to output without it, greedy and seeded, and the two block
tables (scheduler's and worker's) must agree after every step."""

from __future__ import annotations

import random

import pytest

from services.scheduler.request import Request
from services.worker.model_runner import ModelRunner
from shared.sampling_rules import SamplingParams
from tests.worker.serve import serve

GREEDY = SamplingParams(temperature=0.0)


def make_requests(prompts: list[list[int]], sampling: SamplingParams, max_tokens: int) -> list[Request]:
    return [Request(f"r{i}", list(p), sampling, max_tokens) for i, p in enumerate(prompts)]


def grounded_prompts(vocab_size: int, num: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat themselves. The tiny model's weights are random, so it does not copy
    text, but after a run of one token it falls into loops (one token, or a few, over and over),
    which prompt lookup predicts; the random texts repeated twice give drafts it mostly rejects."""
    rng = random.Random(seed)
    prompts = [[t] * 16 for t in (777, 100)][:num]
    while len(prompts) < num:
        text = [rng.randrange(3, vocab_size) for _ in range(rng.randrange(12, 40))]
        prompts.append(text + [rng.randrange(3, vocab_size)] + text + text[: rng.randrange(2, 6)])
    return prompts


@pytest.fixture(scope="module")
def runner(tiny_model_dir) -> ModelRunner:
    return ModelRunner(tiny_model_dir, num_blocks=256, block_size=4)


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=0.9, top_p=0.95, seed=7)],
                         ids=["greedy", "seeded"])
def test_output_is_identical_with_and_without_speculation(runner: ModelRunner, sampling: SamplingParams) -> None:
    prompts = grounded_prompts(runner.spec.vocab_size, 4)
    plain = make_requests(prompts, sampling, 40)
    serve(runner, plain, num_speculative_tokens=0)
    spec = make_requests(prompts, sampling, 40)
    batcher = serve(runner, spec, num_speculative_tokens=4)
    for a, b in zip(plain, spec):
        assert a.output_token_ids == b.output_token_ids and a.finish_reason == b.finish_reason, a.request_id
    stats = batcher.speculation
    assert stats.num_draft_tokens_total > 0
    if sampling is GREEDY:
        assert stats.num_accepted_tokens_total > 0, "nothing accepted on a prompt that repeats itself"


def test_max_tokens_and_stop_ids_stay_exact(runner: ModelRunner) -> None:
    [prompt] = grounded_prompts(runner.spec.vocab_size, 1, seed=3)
    plain = Request("p", list(prompt), GREEDY, 25)
    serve(runner, [plain], num_speculative_tokens=0)
    stop = plain.output_token_ids[9]
    cases = [(Request(f"m{n}", list(prompt), GREEDY, n), n) for n in (1, 2, 5, 13)]
    cases.append((Request("s", list(prompt), GREEDY, 25, stop_token_ids=frozenset({stop})), 25))
    serve(runner, [r for r, _ in cases], num_speculative_tokens=6)
    for request, max_tokens in cases[:-1]:
        assert request.output_token_ids == plain.output_token_ids[:max_tokens]
    first_stop = plain.output_token_ids.index(stop)
    assert cases[-1][0].output_token_ids == plain.output_token_ids[:first_stop + 1]


def test_the_real_model_copies_a_given_text_with_drafts_accepted(smollm2_model_dir) -> None:
    from services.tokenizer.codec import Codec  # noqa: PLC0415

    codec = Codec(smollm2_model_dir)
    text = ("The river rises in the northern hills, runs south through three market towns, and reaches "
            "the sea at a wide estuary where the old harbour still stands.")
    chat = [("user", f"Repeat this sentence exactly, word for word:\n\n{text}")]
    prompt = codec.encode(codec.render_chat(chat))
    smol = ModelRunner(smollm2_model_dir, num_blocks=32, block_size=16)
    plain = Request("p", list(prompt), GREEDY, 40)
    serve(smol, [plain], num_speculative_tokens=0, max_num_batched_tokens=512)
    spec = Request("s", list(prompt), GREEDY, 40)
    batcher = serve(smol, [spec], num_speculative_tokens=4, max_num_batched_tokens=512)
    assert spec.output_token_ids == plain.output_token_ids
    assert "river rises" in codec.tokenizer.decode(spec.output_token_ids)
    stats = batcher.speculation
    # Copying is what prompt lookup predicts: most decode steps should keep drafts.
    assert stats.num_accepted_tokens_total >= len(spec.output_token_ids) // 3, vars(stats)
